//! The vhost-user side of a VM port: the backend the protocol handler drives, and the
//! relay in front of it that checks what a frontend sends before the handler sees it.

pub mod backend;
pub mod relay;

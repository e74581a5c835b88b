//! The vhost-user side of a VM port: the backend the protocol handler drives, and the
//! relay in front of it that checks what a frontend sends before the handler sees it, and
//! the worker pool that serves the queue pairs of many ports (`--workers`).

pub mod backend;
pub mod relay;
pub mod worker_pool;

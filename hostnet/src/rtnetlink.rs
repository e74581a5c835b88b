//! One synchronous rtnetlink client: a request sent, its replies collected until the
//! kernel's acknowledgement or the end of a dump.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RtnetlinkError {
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    /// The kernel refused the request (its errno).
    #[error("{0}")]
    Kernel(io::Error),
    #[error("netlink reply could not be decoded: {0}")]
    Decode(String),
}

impl RtnetlinkError {
    /// The kernel's errno, if this is a refusal from the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtnetlinkError::Kernel(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// `msg` as the bytes of one request with `flags` (NLM_F_REQUEST added) and sequence `seq`.
pub fn encode(msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

pub struct Rtnetlink {
    socket: Socket,
    seq: u32,
}

impl Rtnetlink {
    pub fn open() -> Result<Rtnetlink, RtnetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnetlinkError::Socket)?;
        socket.bind_auto().map_err(RtnetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(RtnetlinkError::Socket)?;
        Ok(Rtnetlink { socket, seq: 1 })
    }

    /// Sends one request and collects the replies: until the ACK (`NLM_F_ACK`), the end of
    /// a dump (`NLM_F_DUMP`), or, for a plain get, its one answer.
    pub fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, RtnetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let buf = encode(msg, flags, self.seq);
        self.socket.send(&buf, 0).map_err(RtnetlinkError::Socket)?;

        let mut replies = Vec::new();
        loop {
            let (data, _) = self
                .socket
                .recv_from_full()
                .map_err(RtnetlinkError::Socket)?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| RtnetlinkError::Decode(e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(RtnetlinkError::Decode("zero-length message".into()));
                }
                offset += len;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(code) => Err(RtnetlinkError::Kernel(
                                io::Error::from_raw_os_error(-code.get()),
                            )),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(m) => {
                        replies.push(m);
                        // A plain GET answers with one message and no ACK.
                        if flags & NLM_F_DUMP != NLM_F_DUMP && flags & NLM_F_ACK == 0 {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::{LinkAttribute, LinkMessage};

    #[test]
    fn dumps_this_machines_links_and_reports_the_kernels_errno() {
        let mut nl = Rtnetlink::open().unwrap();
        let links = nl
            .request(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_DUMP,
            )
            .unwrap();
        let lo = links.iter().any(|m| match m {
            RouteNetlinkMessage::NewLink(l) => l
                .attributes
                .iter()
                .any(|a| *a == LinkAttribute::IfName("lo".into())),
            _ => false,
        });
        assert!(lo, "lo is in every namespace");
        // Deleting a link that does not exist: the kernel says ENODEV.
        let mut gone = LinkMessage::default();
        gone.header.index = 0x7fff_fff0;
        let e = nl
            .request(RouteNetlinkMessage::DelLink(gone), NLM_F_ACK)
            .unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENODEV), "{e}");
    }
}

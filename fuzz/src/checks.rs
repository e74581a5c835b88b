//! What each fuzz target checks, on any input: no panic, and the property named on each.
//! Shared by the libFuzzer targets (`fuzz_targets/`, nightly, `cargo fuzz run`) and by the
//! corpus replay that runs on stable in the test suite (`integration/tests/fuzz_corpus.rs`).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use vhost_net_backend::mem::{GuestMemory, Ram};
use vhost_net_backend::packet::ingress::{self, Limits};
use vhost_net_backend::packet::offload::{complete_checksum, segment_tcp};
use vhost_net_backend::vhost_user::relay::{check_mem_table, Filter, Message, Verdict};
use vhost_net_backend::virtio::chain::{walk_chain, DescTable};
use vhost_net_backend::virtio::{features as f, NetHdr};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory of the chain target: two regions back to back, so that buffers and
/// tables may span both.
const REGION: u64 = 0x8000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// The chain walker against a plain reference walker, over guest memory made of the input:
/// both accept the same chains, with the same buffers; every buffer lies in guest memory.
pub fn chain_walk(data: &[u8]) {
    if data.len() < 6 {
        return;
    }
    let (size, head, flags) = (
        u16::from_le_bytes([data[0], data[1]]) % 512 + 1,
        u16::from_le_bytes([data[2], data[3]]),
        data[4],
    );
    let (writable, indirect_ok) = (flags & 1 != 0, flags & 2 != 0);
    let table_at = u64::from(data[5]) * 64;
    let image = &data[6..];
    // One guest memory for every run (made once: an mmap per run costs more than the walk).
    static RAM: OnceLock<Ram> = OnceLock::new();
    let ram = RAM.get_or_init(|| {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .expect("guest memory");
        Ram::new(Arc::new(mem))
    });
    let mut flat = vec![0u8; 2 * REGION as usize];
    let n = image.len().min(flat.len());
    flat[..n].copy_from_slice(&image[..n]);
    ram.memory()
        .write_slice(&flat, GuestAddress(0))
        .expect("fits");
    let table = DescTable::new(ram, GuestAddress(table_at), size).with_indirect(indirect_ok);
    let mut segs = Vec::new();
    let got = walk_chain(ram, &table, head, writable, &mut segs);
    let want = reference_walk(&flat, table_at, size, head, writable, indirect_ok);
    match (&got, &want) {
        (Ok(total), Ok(bufs)) => {
            let segs: Vec<(u64, u32)> = segs.iter().map(|s| (s.addr.0, s.len)).collect();
            assert_eq!(&segs, bufs, "buffers differ");
            assert_eq!(
                u64::from(*total),
                bufs.iter().map(|b| u64::from(b.1)).sum::<u64>()
            );
            for (addr, len) in bufs {
                assert!(
                    addr + u64::from(*len) <= 2 * REGION,
                    "buffer outside memory"
                );
            }
        }
        (Err(_), Err(_)) => {}
        _ => panic!("walker {got:?}, reference {want:?}"),
    }
}

/// The chain rules, written plainly: follow `next` while NEXT is set, at most the table's
/// size per table (and 1024 descriptors in all); an indirect descriptor (if negotiated, not
/// inside an indirect table, without NEXT) is a table of len/16 descriptors walked from 0;
/// every buffer must lie in memory and go the wanted way; empty buffers add nothing.
fn reference_walk(
    mem: &[u8],
    table: u64,
    size: u16,
    head: u16,
    writable: bool,
    indirect_ok: bool,
) -> Result<Vec<(u64, u32)>, &'static str> {
    let inside = |addr: u64, len: u64| {
        addr.checked_add(len)
            .is_some_and(|end| end <= mem.len() as u64)
    };
    let (mut table, mut size, mut index) = (table, u64::from(size), u64::from(head));
    let (mut left_here, mut left_all, mut in_indirect) = (size, 1024u32, false);
    let mut bufs = Vec::new();
    let mut total = 0u64;
    loop {
        if left_all == 0 {
            return Err("too many descriptors");
        }
        left_all -= 1;
        if index >= size {
            return Err("index out of range");
        }
        let at = table + index * 16;
        if !inside(at, 16) {
            return Err("table outside memory");
        }
        let d = &mem[at as usize..at as usize + 16];
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
        let flags = u16::from_le_bytes([d[12], d[13]]);
        let next = u16::from_le_bytes([d[14], d[15]]);
        if flags & F_INDIRECT != 0 {
            if !indirect_ok || in_indirect || flags & F_NEXT != 0 {
                return Err("indirect not allowed here");
            }
            if len == 0 || len % 16 != 0 || len / 16 > 65535 || !inside(addr, u64::from(len)) {
                return Err("bad indirect table");
            }
            (table, size, index) = (addr, u64::from(len / 16), 0);
            left_here = size;
            in_indirect = true;
            continue;
        }
        if (flags & F_WRITE != 0) != writable {
            return Err("wrong direction");
        }
        if len > 0 {
            if !inside(addr, u64::from(len)) {
                return Err("buffer outside memory");
            }
            total += u64::from(len);
            if total > u64::from(u32::MAX) {
                return Err("length overflow");
            }
            bufs.push((addr, len));
        }
        left_here -= 1;
        if flags & F_NEXT == 0 {
            return Ok(bufs);
        }
        if left_here == 0 {
            return Err("loop");
        }
        index = u64::from(next);
    }
}

/// A virtio-net header and a frame that the ingress check lets in: finishing its checksum
/// writes inside the frame after the Ethernet header; its TCP segments each fit the MTU,
/// carry valid IPv4 and TCP checksums, and put the payload back together.
pub fn offload(data: &[u8]) {
    if data.len() < 12 {
        return;
    }
    let hdr = NetHdr::parse(&data[..10]);
    let frame = &data[10..];
    if frame.len() < 14 {
        return;
    }
    const MTU_FRAME: usize = 1514;
    let limits = Limits {
        max_frame_len: MTU_FRAME,
        offloads: f::CSUM | f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_ECN,
    };
    if ingress::check(&hdr, &frame[..14.min(frame.len())], frame.len(), limits).is_err() {
        return;
    }
    if !hdr.is_gso() {
        assert!(
            frame.len() <= MTU_FRAME,
            "a plain frame over the MTU was let in"
        );
    }
    if hdr.needs_csum() {
        let (start, off) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
        assert!(
            start >= 14,
            "a checksum starting in the Ethernet header was let in"
        );
        let mut copy = frame.to_vec();
        if complete_checksum(&mut copy, start, off).is_ok() {
            assert_eq!(
                copy[..start],
                frame[..start],
                "bytes before csum_start changed"
            );
        }
    }
    if !hdr.is_gso() {
        return;
    }
    let mut out = vec![0u8; 65_535 + 14];
    let mut payload = Vec::new();
    let mut headers_len = None;
    let result = segment_tcp(frame, &hdr, &mut out, |seg| {
        assert!(
            seg.len() <= MTU_FRAME,
            "a {}-byte segment over the MTU",
            seg.len()
        );
        let l4 = verify_segment(seg);
        let doff = usize::from(seg[l4 + 12] >> 4) * 4;
        headers_len.get_or_insert(l4 + doff);
        payload.extend_from_slice(&seg[l4 + doff..]);
        Ok::<(), ()>(())
    });
    if let (Ok(Ok(_)), Some(h)) = (result, headers_len) {
        // The segments carry the frame's payload, in order, once.
        assert_eq!(payload, frame[h..], "payload not reassembled");
    }
}

/// RFC 1071, written plainly (not the switch's own code): the ones'-complement sum.
fn ones_sum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for p in parts {
        for pair in p.chunks(2) {
            let hi = u64::from(pair[0]) << 8;
            sum += hi | pair.get(1).map_or(0, |b| u64::from(*b));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Checks a segment's IP header checksum (IPv4) and TCP checksum, and that its IP length
/// is its own; returns where its TCP header starts.
fn verify_segment(seg: &[u8]) -> usize {
    let l3 = 14;
    let ethertype = u16::from_be_bytes([seg[12], seg[13]]);
    let (l4, pseudo) = match ethertype {
        0x0800 => {
            let ihl = usize::from(seg[l3] & 15) * 4;
            assert_eq!(
                ones_sum(&[&seg[l3..l3 + ihl]]),
                0xffff,
                "bad IPv4 header checksum"
            );
            let total = usize::from(u16::from_be_bytes([seg[l3 + 2], seg[l3 + 3]]));
            assert_eq!(total, seg.len() - l3, "IPv4 total length");
            let mut p = seg[l3 + 12..l3 + 20].to_vec();
            p.extend_from_slice(&[0, 6]);
            p.extend_from_slice(&((seg.len() - l3 - ihl) as u16).to_be_bytes());
            (l3 + ihl, p)
        }
        0x86dd => {
            let plen = usize::from(u16::from_be_bytes([seg[l3 + 4], seg[l3 + 5]]));
            assert_eq!(plen, seg.len() - l3 - 40, "IPv6 payload length");
            let mut p = seg[l3 + 8..l3 + 40].to_vec();
            p.extend_from_slice(&(plen as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 6]);
            (l3 + 40, p)
        }
        other => panic!("a segment with ethertype {other:#06x}"),
    };
    assert_eq!(ones_sum(&[&pseudo, &seg[l4..]]), 0xffff, "bad TCP checksum");
    l4
}

/// vhost-user messages, as the relay's filter judges them: no panic, and what it keeps
/// stays bounded (at most one early enable per ring).
pub fn relay(data: &[u8]) {
    let offered = Arc::new(AtomicU64::new(u64::MAX));
    let mut filter = Filter::new(4, offered);
    let mut rest = data;
    while rest.len() >= 6 {
        let request = u32::from(rest[0]) % 64;
        let flags = u32::from(rest[1]);
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])) % 512;
        let body = &rest[4..];
        let len = len.min(body.len());
        let msg = Message {
            request,
            flags,
            payload: body[..len].to_vec(),
            fds: Vec::new(),
        };
        rest = &body[len..];
        let _ = check_mem_table(&msg);
        let verdict = filter.judge(&msg);
        if let Verdict::Forward = verdict {
            if request == 2 {
                // SET_FEATURES forwarded: the early enables are replayed, each once.
                assert!(filter.replay(&msg).len() <= 5, "more replayed than rings");
            }
        }
        assert!(
            filter.kept() <= 4,
            "kept {} early enables for 4 rings",
            filter.kept()
        );
    }
}

/// The parsers of frames from guests and the tap: no panic on any bytes.
pub fn frame_parsers(data: &[u8]) {
    if data.len() < 14 {
        return;
    }
    let head: &[u8; 14] = data[..14].try_into().unwrap();
    let _ = vhost_net_backend::packet::meta::FrameMeta::parse(head);
    for zone in [0, 1] {
        let _ = vhost_net_backend::packet::l3::parse(&data[..data.len().min(128)], zone);
    }
    let hdr = NetHdr::parse(&data[..12]);
    let limits = Limits {
        max_frame_len: 9014,
        offloads: u64::from(data[0]) << 8,
    };
    let _ = ingress::check(&hdr, &data[..14], data.len(), limits);
}

/// The config parsers: a switch config file and a `--port` spec; no panic, and a config
/// that validates also compiles its policy without panicking.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = vhost_net_backend::PortConfig::parse_spec(text);
    if let Ok(c) = vhost_net_backend::SwitchConfig::from_toml(text) {
        if c.validate().is_ok() {
            let _ = vhost_net_backend::policy::rules::RuleSet::compile(&c);
        }
    }
}

/// The switching decision over a sequence of frames: up to 8 ports (segments, trunks and
/// pinned MACs from the input), then frames (source port, a trunk's tag, source and
/// destination MAC from small sets, so that they meet). Whatever the order: a frame goes
/// only to a port of its own segment or a trunk, never back to its source; a MAC pinned to
/// a port is refused from any other and never learned there; the cached decision is the
/// uncached one.
pub fn switching(data: &[u8]) {
    use vhost_net_backend::switch::{DecisionCache, Forward, PortProfile, Switch};
    use vhost_net_backend::types::TRUNK;
    use vhost_net_backend::MacAddr;
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8) + 1;
    if rest.len() < 2 * n {
        return;
    }
    let (spec, frames) = rest.split_at(2 * n);
    // A small universe of MACs: unicast 02:..:k and a multicast one.
    let mac = |k: u8| {
        if k % 16 == 15 {
            MacAddr([0x01, 0, 0x5e, 0, 0, 1])
        } else {
            MacAddr([2, 0, 0, 0, 0, k % 16])
        }
    };
    let profiles: Vec<PortProfile> = spec
        .chunks(2)
        .map(|b| PortProfile {
            // Three segments and trunks.
            segment: match b[0] % 4 {
                3 => TRUNK,
                s => u16::from(s) + 10,
            },
            mac: (b[1] & 0x80 != 0).then(|| mac(b[1])),
            max_macs: (b[1] & 0x40 != 0).then_some(u16::from(b[1] & 3) + 1),
        })
        .collect();
    // Two MACs pinned to two ports: `mac=` is unique in a valid config.
    let mut pinned = std::collections::HashMap::new();
    let profiles: Vec<PortProfile> = profiles
        .into_iter()
        .enumerate()
        .map(|(i, mut p)| {
            if let Some(m) = p.mac {
                if pinned.insert(m, i).is_some() || m.is_multicast() {
                    p.mac = None;
                    pinned.retain(|_, port| *port != i);
                }
            }
            p
        })
        .collect();
    let pinned: std::collections::HashMap<MacAddr, usize> = profiles
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((p.mac?, i)))
        .collect();
    let switch = Switch::new(&profiles, 300);
    let twin = Switch::new(&profiles, 300);
    let mut cache = DecisionCache::default();
    for f in frames.chunks_exact(4) {
        let src = usize::from(f[0]) % n;
        let segment = match profiles[src].segment {
            TRUNK => u16::from(f[1] % 4) + 10,
            s => s,
        };
        let (src_mac, dst_mac) = (mac(f[2]), mac(f[3]));
        if src_mac.is_multicast() {
            continue;
        }
        let id = src as u16;
        let plain = twin.decide(id, segment, src_mac, dst_mac);
        let cached = switch.decide_cached(&mut cache, id, segment, src_mac, dst_mac);
        assert_eq!(plain, cached, "cached decision differs");
        let in_segment = |p: usize| {
            let s = profiles[p].segment;
            s == segment || s == TRUNK
        };
        match plain {
            Forward::To(p) => {
                let p = usize::from(p);
                assert!(p < n && p != src, "to port {p} from {src}");
                assert!(in_segment(p), "to port {p} outside segment {segment}");
            }
            Forward::Flood => {
                for p in switch.flood_targets(id, segment) {
                    let p = usize::from(p);
                    assert!(p != src && in_segment(p), "flooded to {p} from {src}");
                }
            }
            Forward::Spoofed => {}
            Forward::Local => {}
            other => panic!("the switch alone decided {other:?}"),
        }
        if let Some(&owner) = pinned.get(&src_mac) {
            if owner != src {
                assert_eq!(plain, Forward::Spoofed, "pinned MAC from port {src}");
            }
        }
        // A pinned MAC is never learned behind another port.
        for (m, &owner) in &pinned {
            for p in (0..n).filter(|p| *p != owner) {
                assert!(
                    !switch.macs.holds(segment, *m, p as u16),
                    "pinned {m} at {p}"
                );
            }
        }
    }
}

/// The receiver's memory of the RX target: two regions back to back, its ring at fixed
/// places (descriptors, avail ring, used ring), the rest for buffers.
const RX_MEM: u64 = 0x10000;
const RX_DESC: u64 = 0;
const RX_AVAIL: u64 = 0x1000;
const RX_USED: u64 = 0x2000;

/// A frame of the RX target: IPv4, TCP or UDP, `len` bytes, with a virtio header of the
/// kind `mode` says (0 none, 1 checksum to complete, 2 TSO, 3 as the input gives it).
fn rx_frame(len: usize, mode: u8, raw_hdr: &[u8], mss: u16, udp: bool) -> (NetHdr, Vec<u8>) {
    let len = len.max(14 + 20 + 20);
    let mut f: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip.copy_from_slice(&[
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    ip[2..4].copy_from_slice(&((len - 14).min(65535) as u16).to_be_bytes());
    if udp {
        ip[9] = 17;
    }
    let sum = !ones_sum(&[&f[14..34]]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    if udp {
        f[38..40].copy_from_slice(&((len - 34).min(65535) as u16).to_be_bytes());
        f[40..42].fill(0);
    } else {
        f[46] = 0x50;
        f[47] = 0x18;
    }
    let mut hdr = NetHdr::default();
    match mode % 4 {
        0 => {}
        1 => {
            hdr.flags = 1;
            hdr.csum_start = 34;
            hdr.csum_offset = if udp { 6 } else { 16 };
        }
        2 => {
            hdr.flags = 1;
            hdr.csum_start = 34;
            hdr.csum_offset = 16;
            hdr.gso_type = 1;
            hdr.hdr_len = 54;
            hdr.gso_size = mss;
        }
        _ => hdr = NetHdr::parse(raw_hdr),
    }
    (hdr, f)
}

/// The RX writers over the receiver's memory made of the input (its descriptors, avail
/// ring and buffers), frames delivered one by one (`deliver`) or as a run from a sender's
/// memory (`deliver_run`), with the receiver's features taken from the input: no byte
/// changes outside the used ring and the buffers of the chains posted (walked by the
/// reference walker: a chain it refuses gets nothing written); every used entry's length
/// fits its chain, and a refused chain comes back with length 0.
pub fn rx_write(data: &[u8]) {
    use vhost_net_backend::counters::PortCounters;
    use vhost_net_backend::endpoint::frame::MAX_HEAD;
    use vhost_net_backend::endpoint::vm::{RxScratch, VmEndpoint, VmPort};
    use vhost_net_backend::vring::Vring;
    use vm_memory::GuestMemoryAtomic;

    // Per frame: length, header kind, MSS, UDP or TCP, and a virtio header for kind 3.
    const SPEC: usize = 16;
    if data.len() < 4 {
        return;
    }
    let size = 1u16 << (data[0] % 9);
    let mut features = f::VERSION_1;
    for (bit, feature) in [
        f::MRG_RXBUF,
        f::RING_EVENT_IDX,
        f::RING_INDIRECT_DESC,
        f::GUEST_CSUM,
        f::GUEST_TSO4,
        f::GUEST_TSO6,
        f::GUEST_ECN,
    ]
    .into_iter()
    .enumerate()
    {
        if data[1] & (1 << bit) != 0 {
            features |= feature;
        }
    }
    let as_run = data[2] & 1 != 0;
    let count = usize::from(data[3] % 8) + 1;
    let specs = &data[4..];
    let image = specs.get(count * SPEC..).unwrap_or(&[]);

    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    let mem = MEM.get_or_init(|| {
        let half = (RX_MEM / 2) as usize;
        GuestMemory::from_ranges(&[(GuestAddress(0), half), (GuestAddress(RX_MEM / 2), half)])
            .expect("guest memory")
    });
    let mut flat = vec![0u8; RX_MEM as usize];
    let n = image.len().min(flat.len());
    flat[..n].copy_from_slice(&image[..n]);
    // The device's own fields start as a fresh ring's: used index 0, nothing used yet.
    flat[RX_USED as usize..RX_USED as usize + 4].fill(0);
    mem.write_slice(&flat, GuestAddress(0)).expect("fits");

    let event_idx = features & f::RING_EVENT_IDX != 0;
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let Ok(vring) = Vring::started(
        atomic.clone(),
        size,
        (RX_DESC, RX_AVAIL, RX_USED),
        event_idx,
    ) else {
        return;
    };
    let vm = VmEndpoint::new(1);
    {
        let mut rx = vm.rx_write();
        rx.mem = Some(atomic);
        rx.features = features;
        rx.features_acked = true;
        rx.queues = vec![Some(vring)];
    }
    let counters = PortCounters::default();
    let dst = VmPort {
        id: 0,
        name: "fuzz",
        counters: &counters,
        vm: &vm,
    };
    let limits = Limits {
        max_frame_len: 9014,
        offloads: f::CSUM | f::HOST_TSO4 | f::HOST_TSO6 | f::HOST_ECN,
    };
    let mut frames: Vec<(NetHdr, Vec<u8>)> = Vec::new();
    for spec in specs.chunks_exact(SPEC).take(count) {
        let len = usize::from(u16::from_le_bytes([spec[0], spec[1]]));
        let mss = u16::from_le_bytes([spec[3], spec[4]]);
        let (hdr, frame) = rx_frame(len, spec[2], &spec[6..16], mss, spec[5] & 1 != 0);
        if ingress::check(
            &hdr,
            &frame[..MAX_HEAD.min(frame.len())],
            frame.len(),
            limits,
        )
        .is_ok()
        {
            frames.push((hdr, frame));
        }
    }
    thread_local! {
        // Made once: a scratch holds two 64 KiB buffers, zeroed, each time it is made.
        static SCRATCH: std::cell::RefCell<RxScratch> =
            std::cell::RefCell::new(RxScratch::default());
    }
    SCRATCH.with(|s| deliver_all(&mut s.borrow_mut(), dst, &frames, as_run));
    check_rx_writes(&flat, mem, size, features & f::RING_INDIRECT_DESC != 0);
}

/// Delivers `frames` to `dst`, one by one or as runs from a sender's memory, then flushes.
fn deliver_all(
    scratch: &mut vhost_net_backend::endpoint::vm::RxScratch,
    dst: vhost_net_backend::endpoint::vm::VmPort<'_>,
    frames: &[(NetHdr, Vec<u8>)],
    as_run: bool,
) {
    use vhost_net_backend::counters::PortCounters;
    use vhost_net_backend::endpoint::frame::{TxFrame, MAX_HEAD};
    use vhost_net_backend::virtio::chain::Segment;
    use vhost_net_backend::virtio::copy::Cursor;

    let from = PortCounters::default();
    if as_run && !frames.is_empty() {
        // The frames in a sender's memory, one buffer each, as a TX burst holds them.
        static SENDER: OnceLock<Ram> = OnceLock::new();
        let sender = SENDER.get_or_init(|| {
            let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 8 * 0x1_0000)])
                .expect("sender memory");
            Ram::new(Arc::new(mem))
        });
        let mut segs = Vec::new();
        let mut tx = Vec::new();
        for (k, (hdr, frame)) in frames.iter().enumerate() {
            let at = k as u64 * 0x1_0000;
            sender
                .memory()
                .write_slice(frame, GuestAddress(at))
                .expect("fits");
            segs.push(Segment {
                addr: GuestAddress(at),
                len: frame.len() as u32,
            });
            let mut peeked = [0u8; 12 + MAX_HEAD];
            let head_len = frame.len().min(MAX_HEAD);
            peeked[..head_len].copy_from_slice(&frame[..head_len]);
            tx.push(TxFrame {
                hdr: *hdr,
                first: k,
                end: k + 1,
                start: Cursor::default(),
                len: frame.len(),
                peeked,
                hdr_len: 0,
                head_len,
                hash: 7,
            });
        }
        let mut done = 0;
        while done < tx.len() {
            let n = scratch.deliver_run(dst, sender, &segs, &tx[done..], None, 0);
            if n == 0 {
                // Not for the run path (software offload): delivered alone.
                let (hdr, frame) = &frames[done];
                scratch.next_frame();
                scratch.deliver(&from, dst, &local(hdr, frame));
                done += 1;
            }
            done += n;
        }
    } else {
        for (hdr, frame) in frames {
            scratch.next_frame();
            scratch.deliver(&from, dst, &local(hdr, frame));
        }
    }
    scratch.flush(|id| (id == 0).then_some(dst));
}

/// Guest memory's bytes now, region by region.
fn guest_bytes(mem: &GuestMemory) -> Vec<u8> {
    let mut out = vec![0u8; RX_MEM as usize];
    mem.read_slice(&mut out, GuestAddress(0)).expect("fits");
    out
}

/// The RX target's oracle: `before` is the receiver's memory before the deliveries.
fn check_rx_writes(before: &[u8], mem: &GuestMemory, size: u16, indirect_ok: bool) {
    let avail_idx =
        u16::from_le_bytes([before[RX_AVAIL as usize + 2], before[RX_AVAIL as usize + 3]]);
    let posted = avail_idx.min(size);
    let heads: Vec<u16> = (0..posted)
        .map(|slot| {
            let at = (RX_AVAIL + 4 + 2 * u64::from(slot)) as usize;
            u16::from_le_bytes([before[at], before[at + 1]])
        })
        .collect();
    // What the device may write: the used ring (with avail_event), and posted chains.
    let used_end = RX_USED + 6 + 8 * u64::from(size);
    let mut allowed: Vec<(u64, u64)> = Vec::new();
    let mut chains = std::collections::HashMap::new();
    for &head in &heads {
        let walked = reference_walk(before, RX_DESC, size, head, true, indirect_ok);
        if let Ok(bufs) = &walked {
            for (addr, len) in bufs {
                allowed.push((*addr, addr + u64::from(*len)));
            }
        }
        chains.insert(
            head,
            walked.map(|b| b.iter().map(|x| u64::from(x.1)).sum::<u64>()),
        );
    }
    // A guest may post buffers over its own rings or indirect tables: the device then
    // reads what it wrote before (later chains, used entries), which the walks above, of
    // the memory before, cannot foresee. Memory safety is all that holds then (every
    // access is bounds-checked, and ASan watches the rest).
    let mut tables: Vec<(u64, u64)> = vec![(0, used_end)];
    for &head in &heads {
        let mut index = u64::from(head);
        for _ in 0..size {
            if index >= u64::from(size) {
                break;
            }
            let d = (RX_DESC + 16 * index) as usize;
            let addr = u64::from_le_bytes(before[d..d + 8].try_into().expect("8 bytes"));
            let len = u64::from(u32::from_le_bytes(
                before[d + 8..d + 12].try_into().expect("4"),
            ));
            let flags = u16::from_le_bytes([before[d + 12], before[d + 13]]);
            if flags & F_INDIRECT != 0 {
                tables.push((addr, addr.saturating_add(len)));
            }
            if flags & F_NEXT == 0 {
                break;
            }
            index = u64::from(u16::from_le_bytes([before[d + 14], before[d + 15]]));
        }
    }
    if allowed
        .iter()
        .any(|(s, e)| tables.iter().any(|(ts, te)| s < te && ts < e))
    {
        return;
    }
    allowed.push((RX_USED, used_end));
    let after = guest_bytes(mem);
    for (k, (old, new)) in before.chunks(256).zip(after.chunks(256)).enumerate() {
        if old == new {
            continue;
        }
        for (i, (o, n)) in old.iter().zip(new).enumerate() {
            let addr = (k * 256 + i) as u64;
            assert!(
                o == n || allowed.iter().any(|(s, e)| *s <= addr && addr < *e),
                "byte {addr:#x} written outside the used ring and the posted buffers"
            );
        }
    }
    let used_idx = u16::from_le_bytes([after[RX_USED as usize + 2], after[RX_USED as usize + 3]]);
    assert!(
        used_idx <= posted,
        "{used_idx} used entries for {posted} posted"
    );
    for i in 0..used_idx {
        let at = (RX_USED + 4 + 8 * u64::from(i % size)) as usize;
        let id = u32::from_le_bytes(after[at..at + 4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(after[at + 4..at + 8].try_into().expect("4 bytes"));
        let Ok(head) = u16::try_from(id) else {
            panic!("used entry {i}: id {id} is no posted head");
        };
        match chains.get(&head) {
            Some(Ok(cap)) => assert!(u64::from(len) <= *cap, "used entry {i}: {len} > {cap}"),
            Some(Err(_)) => assert_eq!(len, 0, "used entry {i}: a refused chain written"),
            None => panic!("used entry {i}: head {head} was never posted"),
        }
    }
}

/// A frame from a local buffer (as from the tap), as the pipeline hands it over.
fn local<'a>(hdr: &NetHdr, frame: &'a [u8]) -> vhost_net_backend::endpoint::frame::Frame<'a> {
    vhost_net_backend::endpoint::frame::Frame {
        hdr: *hdr,
        src: vhost_net_backend::virtio::copy::FrameSource::Local(frame),
        head: &frame[..frame
            .len()
            .min(vhost_net_backend::endpoint::frame::MAX_HEAD)],
        hash: 7,
        segment: 0,
    }
}

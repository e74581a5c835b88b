//! `ctl capture`: a port's frames, both ways, written as a pcap file (what tcpdump and
//! Wireshark read) by a thread of its own, so that a slow disk never slows a port.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use log::{info, warn};

use crate::endpoint::capture::{Captured, SNAPLEN};
use crate::endpoint::SwitchPort;

/// Frames a capture keeps unless told otherwise.
pub const DEFAULT_COUNT: u64 = 1000;
/// Frames waiting for the writer before the next ones are counted as lost.
const QUEUE: usize = 4096;
/// LINKTYPE_ETHERNET.
const ETHERNET: u32 = 1;

/// The classic pcap format: a file header, then a record header and the bytes per frame.
pub struct PcapWriter<W: Write> {
    out: W,
}

impl<W: Write> PcapWriter<W> {
    pub fn new(mut out: W) -> std::io::Result<Self> {
        out.write_all(&0xa1b2_c3d4u32.to_le_bytes())?; // microsecond timestamps
        out.write_all(&2u16.to_le_bytes())?;
        out.write_all(&4u16.to_le_bytes())?;
        out.write_all(&0i32.to_le_bytes())?; // UTC
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&(SNAPLEN as u32).to_le_bytes())?;
        out.write_all(&ETHERNET.to_le_bytes())?;
        Ok(PcapWriter { out })
    }

    pub fn write(&mut self, frame: &Captured) -> std::io::Result<()> {
        let t = frame.at.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.out.write_all(&(t.as_secs() as u32).to_le_bytes())?;
        self.out.write_all(&t.subsec_micros().to_le_bytes())?;
        self.out
            .write_all(&(frame.bytes.len() as u32).to_le_bytes())?;
        self.out.write_all(&(frame.len as u32).to_le_bytes())?;
        self.out.write_all(&frame.bytes)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Starts capturing `count` frames of `port` into `path`, a new file (an existing one,
/// or a link, is refused: the switch may run as root). Returns at once.
pub fn start(port: Arc<SwitchPort>, path: &Path, count: u64) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!(
            "capture file {}: give an absolute path (the switch's working directory is not yours)",
            path.display()
        ));
    }
    if port.capture.active() {
        return Err(format!("port {} is being captured already", port.name));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("capture file {}: {e}", path.display()))?;
    let mut writer = PcapWriter::new(BufWriter::new(file))
        .map_err(|e| format!("capture file {}: {e}", path.display()))?;
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    if !port.capture.start(tx) {
        let _ = std::fs::remove_file(path);
        return Err(format!("port {} is being captured already", port.name));
    }
    let path: PathBuf = path.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name(format!("capture-{}", port.name))
        .spawn({
            let port = port.clone();
            move || write_frames(&port, &path, &mut writer, rx, count)
        });
    if let Err(e) = spawned {
        port.capture.stop();
        return Err(format!("cannot start the capture thread: {e}"));
    }
    Ok(())
}

fn write_frames(
    port: &SwitchPort,
    path: &Path,
    writer: &mut PcapWriter<BufWriter<File>>,
    rx: mpsc::Receiver<Captured>,
    count: u64,
) {
    let mut written = 0;
    while written < count {
        // Flushed whenever the queue runs dry, so a reader sees frames as they come.
        let frame = match rx.try_recv() {
            Ok(f) => f,
            Err(mpsc::TryRecvError::Empty) => {
                let _ = writer.flush();
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(f) => f,
                    Err(mpsc::RecvTimeoutError::Timeout) if port.capture.active() => continue,
                    Err(_) => break,
                }
            }
            Err(mpsc::TryRecvError::Disconnected) => break,
        };
        if let Err(e) = writer.write(&frame) {
            warn!(
                "port {}: capture to {}: {e}; stopped",
                port.name,
                path.display()
            );
            break;
        }
        written += 1;
    }
    port.capture.stop();
    let _ = writer.flush();
    let lost = port.capture.lost.load(Ordering::Relaxed);
    info!(
        "port {}: capture to {} done: {written} frames{}",
        port.name,
        path.display(),
        if lost > 0 {
            format!(", {lost} lost (the writer was behind)")
        } else {
            String::new()
        }
    );
}

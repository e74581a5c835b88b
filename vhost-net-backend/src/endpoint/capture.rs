//! A port's capture point (`ctl capture`): copies of the frames it sends and receives,
//! taken only while a capture runs and handed to the capture's writer through a bounded
//! channel that is never waited on. Idle, it costs one relaxed load per burst and per
//! delivery.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::SystemTime;

use super::frame::Frame;

/// Largest part of a frame kept (a whole 64 KiB GSO frame).
pub const SNAPLEN: usize = 65_535 + 14 + 4;

/// One captured frame.
pub struct Captured {
    pub at: SystemTime,
    /// Its length on the wire (a GSO frame: before segmentation).
    pub len: usize,
    pub bytes: Vec<u8>,
}

#[derive(Default)]
pub struct Capture {
    active: AtomicBool,
    sink: Mutex<Option<SyncSender<Captured>>>,
    /// Frames not captured because the writer was behind.
    pub lost: AtomicU64,
}

impl Capture {
    #[inline(always)]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Starts handing frames to `sink`; false if a capture runs already.
    pub fn start(&self, sink: SyncSender<Captured>) -> bool {
        let mut s = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if s.is_some() {
            return false;
        }
        *s = Some(sink);
        self.lost.store(0, Ordering::Relaxed);
        self.active.store(true, Ordering::Release);
        true
    }

    pub fn stop(&self) {
        self.active.store(false, Ordering::Release);
        *self.sink.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Copies `frame` for the capture (its head as switched, then the rest).
    #[cold]
    pub fn record(&self, frame: &Frame<'_>) {
        let len = frame.src.len();
        let mut bytes = vec![0u8; len.min(SNAPLEN)];
        let n = frame.src.peek(&mut bytes);
        bytes.truncate(n);
        let head = frame.head.len().min(bytes.len());
        bytes[..head].copy_from_slice(&frame.head[..head]);
        let captured = Captured {
            at: SystemTime::now(),
            len,
            bytes,
        };
        let sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = sink.as_ref() else {
            return;
        };
        match tx.try_send(captured) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                // The writer finished (its count reached, or stopped).
                self.active.store(false, Ordering::Release);
            }
        }
    }
}

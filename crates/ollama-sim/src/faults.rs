//! Fault injection: exit with a code, stop answering, leak memory steadily.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::runner::hold_memory;

/// The faults in effect.
#[derive(Debug, Default)]
pub struct Faults {
    hung: AtomicBool,
    leak_rate: AtomicU64,
    leaked_bytes: AtomicU64,
    leaked: Mutex<Vec<Vec<u8>>>,
}

impl Faults {
    /// Whether requests are no longer answered.
    pub fn is_hung(&self) -> bool {
        self.hung.load(Ordering::SeqCst)
    }

    /// Stops answering every request from now on (connections stay open, nothing comes back).
    pub fn hang(&self) {
        eprintln!("level=WARN source=sim msg=\"fault: hanging, no more answers\"");
        self.hung.store(true, Ordering::SeqCst);
    }

    /// Sets the leak rate in bytes per second (0 stops leaking; what leaked stays).
    pub fn set_leak_rate(&self, bytes_per_second: u64) {
        self.leak_rate.store(bytes_per_second, Ordering::SeqCst);
    }

    /// Bytes leaked so far.
    pub fn leaked_bytes(&self) -> u64 {
        self.leaked_bytes.load(Ordering::SeqCst)
    }

    /// Current leak rate.
    pub fn leak_rate(&self) -> u64 {
        self.leak_rate.load(Ordering::SeqCst)
    }

    /// One step of the leak: called every `tick`.
    pub fn leak_tick(&self, tick: Duration) {
        let rate = self.leak_rate();
        if rate == 0 {
            return;
        }
        let bytes = (rate as f64 * tick.as_secs_f64()) as usize;
        if bytes == 0 {
            return;
        }
        let chunk = hold_memory(bytes);
        self.leaked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(chunk);
        self.leaked_bytes.fetch_add(bytes as u64, Ordering::SeqCst);
    }
}

/// Ends the process with `code`, as a crash would (no cleanup).
pub fn exit_now(code: i32, why: &str) -> ! {
    eprintln!("level=ERROR source=sim msg=\"fault: exiting\" code={code} reason={why:?}");
    std::process::exit(code)
}

//! The agent's clock: tokio's, so that tests can pause and advance it.
//!
//! Durations are measured with [`Instant`] (tokio's, which follows a paused test clock); the
//! wall clock is [`now`]. In production both are the real clocks; under
//! `#[tokio::test(start_paused = true)]` both move only as tokio advances time, so a test that
//! waits 30 s of backoff runs in milliseconds and still sees every timer fire in order.

use std::time::{Duration, SystemTime};

pub use tokio::time::Instant;

/// The wall clock, moved by as much as tokio's clock is ahead of (or behind) the real
/// monotonic clock: the real time in production (tokio's clock is the real one there), the
/// virtual time under a paused test clock.
pub fn now() -> SystemTime {
    let tokio_now = Instant::now().into_std();
    let real_now = std::time::Instant::now();
    let wall = SystemTime::now();
    match tokio_now.checked_duration_since(real_now) {
        Some(ahead) => wall + ahead,
        None => wall - real_now.saturating_duration_since(tokio_now),
    }
}

/// `now() + d`.
pub fn after(d: Duration) -> SystemTime {
    now() + d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_paused_runtime_it_is_the_wall_clock() {
        let before = SystemTime::now();
        let t = now();
        let after = SystemTime::now();
        assert!(t + Duration::from_millis(5) >= before && t <= after + Duration::from_millis(5));
    }

    #[tokio::test(start_paused = true)]
    async fn under_a_paused_clock_it_moves_with_tokio() {
        let t0 = now();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let moved = now().duration_since(t0).expect("forward");
        assert!(
            // (Three clocks read one after the other: a microsecond either way.)
            moved > Duration::from_millis(3_599_990) && moved < Duration::from_secs(3601),
            "{moved:?}"
        );
    }
}

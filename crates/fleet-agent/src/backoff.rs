//! Per-slot restart backoff, as plain numbers: the first restart at once, then `initial`,
//! doubling up to `max`; a crash after 10 minutes of running starts the count again.

use std::time::Duration;

/// How long an instance must have run for its crash not to count as a crash loop.
pub const RESET_AFTER: Duration = Duration::from_secs(600);

/// The wait before the next attempt after the `failures`-th failure in a row (1-based):
/// `initial`, doubling up to `max`. Every backoff of the agent (image pulls, model
/// preparation, restarts) is this one.
pub fn retry(failures: u32, initial: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    initial
        .checked_mul(1u32 << doublings)
        .unwrap_or(max)
        .min(max)
}

/// The delay before restarting after the `k`-th consecutive crash (1-based): the first
/// restart at once, then [`retry`].
pub fn delay(k: u32, initial: Duration, max: Duration) -> Duration {
    match k {
        0 | 1 => Duration::ZERO,
        k => retry(k - 1, initial, max),
    }
}

/// The consecutive-crash count after an instance that had `previous` crashes behind it ran for
/// `ran` and crashed.
pub fn next_count(previous: u32, ran: Duration) -> u32 {
    if ran >= RESET_AFTER {
        1
    } else {
        previous.saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_initial_to_max() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(300));
        let delays: Vec<u64> = (1..=12).map(|k| delay(k, i, m).as_secs()).collect();
        assert_eq!(delays, [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(delay(100, i, m), m);
        assert_eq!(
            delay(3, Duration::ZERO, m),
            Duration::ZERO,
            "initial 0: always at once"
        );
        assert_eq!(
            delay(2, Duration::from_millis(500), m),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn long_runs_reset_the_count() {
        assert_eq!(next_count(0, Duration::from_secs(1)), 1);
        assert_eq!(next_count(5, Duration::from_secs(30)), 6);
        assert_eq!(next_count(5, RESET_AFTER), 1);
    }
}

//! Reconnect delays: exponential with jitter, capped, never giving up, and
//! back to the shortest only after a session that held.

use std::time::Duration;

/// The first delay is between half of this and this.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest wait between attempts.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How long a session must have lasted for the next reconnect to start from
/// [`BACKOFF_START`] again. Resetting at connect let anything that ends
/// sessions young (two agents with one key replacing each other, an edge
/// that accepts and then crashes) be hammered every 100 ms; a session that
/// outlived the QUIC idle timeout (30 s) has shown the path works.
pub const STABLE_SESSION: Duration = Duration::from_secs(30);

/// The cap for an agent with several edges: a session to each is what
/// makes the cluster survive an edge, so a restarted edge gets its agents
/// back within two seconds (a failed attempt costs one handshake packet).
pub const CLUSTER_BACKOFF_CAP: Duration = Duration::from_millis(1600);

/// Half of `step` plus `jitter` (uniform in `[0, 1)`) of the other half.
pub fn equal_jitter(step: Duration, jitter: f64) -> Duration {
    let half = step / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

/// Exponential backoff with "equal jitter": each delay is half the current
/// step plus a random part of the other half, so agents that lost the same
/// edge do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::with_cap(BACKOFF_CAP)
    }
}

impl Backoff {
    pub fn new() -> Self {
        Self::default()
    }

    /// Delays that never exceed `cap`.
    pub fn with_cap(cap: Duration) -> Self {
        Self { attempt: 0, cap }
    }

    /// The next delay; `jitter` is uniform in `[0, 1)`.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let step = BACKOFF_START
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        equal_jitter(step, jitter)
    }

    /// After a session that worked, start again from the shortest delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// A session ended after `lasted`: one that held [`STABLE_SESSION`]
    /// resets the backoff, a shorter one counts as a failed attempt.
    pub fn session_ended(&mut self, lasted: Duration) {
        if lasted >= STABLE_SESSION {
            self.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_from_under_200ms_to_the_cap() {
        let mut b = Backoff::new();
        let first = b.next_delay(0.999);
        assert!(
            first <= Duration::from_millis(100) && first >= Duration::from_millis(50),
            "{first:?}"
        );
        let mut last = first;
        for _ in 0..40 {
            last = b.next_delay(0.999);
            assert!(last <= BACKOFF_CAP);
        }
        assert!(last >= BACKOFF_CAP / 2, "{last:?}");
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }

    #[test]
    fn only_a_session_that_held_resets_the_delay() {
        let mut b = Backoff::new();
        for _ in 0..3 {
            b.next_delay(0.0);
        }
        b.session_ended(STABLE_SESSION - Duration::from_millis(1));
        assert_eq!(b.next_delay(0.0), BACKOFF_START * 8 / 2, "still growing");
        b.session_ended(STABLE_SESSION);
        assert_eq!(b.next_delay(0.0), BACKOFF_START / 2);
    }
}

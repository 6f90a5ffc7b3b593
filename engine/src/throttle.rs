//! Repeated warnings, throttled: a down upstream or a flood of refused
//! clients must not write one line per client. The first warning of a kind
//! is logged at once; the rest of its window are counted and summed up in
//! one line ("... and 312 more in the last 10 s") when the window ends.

use std::time::{Duration, Instant};

/// How long one logged warning stands for the ones after it.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One kind of warning of one worker.
#[derive(Debug)]
pub struct Throttle {
    /// What the summary line calls the warnings it counts.
    what: &'static str,
    window_start: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub const fn new(what: &'static str) -> Self {
        Throttle { what, window_start: None, suppressed: 0 }
    }

    /// Whether a warning seen `now` is logged (else it is counted). A count
    /// of an earlier window is logged first.
    pub fn admit(&mut self, now: Instant, worker: usize) -> bool {
        match self.window_start {
            Some(start) if now < start + WINDOW => {
                self.suppressed += 1;
                false
            }
            _ => {
                self.flush(now, worker);
                self.window_start = Some(now);
                true
            }
        }
    }

    /// When the count of the current window is due, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.window_start.filter(|_| self.suppressed > 0).map(|start| start + WINDOW)
    }

    /// Logs the count of a window that has ended.
    pub fn flush(&mut self, now: Instant, worker: usize) {
        if self.deadline().is_some_and(|due| due <= now) {
            tracing::warn!(
                worker,
                more = self.suppressed,
                "{} ... and {} more in the last {} s",
                self.what,
                self.suppressed,
                WINDOW.as_secs()
            );
            self.suppressed = 0;
            self.window_start = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_logged_the_rest_of_the_window_counted() {
        let mut throttle = Throttle::new("cannot reach the upstream");
        let start = Instant::now();
        assert!(throttle.admit(start, 0));
        assert_eq!(throttle.deadline(), None, "nothing counted yet");
        for i in 1..=312 {
            assert!(!throttle.admit(start + Duration::from_millis(i), 0));
        }
        assert_eq!(throttle.deadline(), Some(start + WINDOW));
        throttle.flush(start + WINDOW - Duration::from_millis(1), 0);
        assert_eq!(throttle.suppressed, 312, "not due yet");
        throttle.flush(start + WINDOW, 0);
        assert_eq!((throttle.suppressed, throttle.deadline()), (0, None));
        assert!(throttle.admit(start + WINDOW + Duration::from_secs(1), 0), "a new window logs again");
    }
}

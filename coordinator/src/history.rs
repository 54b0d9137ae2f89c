//! The queue's recent length, sampled by the engine's ticker for the console's chart.
//!
//! Pure: times are arguments. Memory is bounded: at most `capacity` samples, the oldest
//! dropped first. Not persisted: after a restart the chart starts empty.

use std::collections::VecDeque;

/// Seconds between two samples.
pub const SAMPLE_EVERY_SECS: f64 = 10.0;
/// Samples kept: an hour at [`SAMPLE_EVERY_SECS`].
pub const SAMPLES_KEPT: usize = 360;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueSample {
    /// Unix time in seconds.
    pub at: f64,
    /// Tasks waiting for a node.
    pub pending: u64,
}

#[derive(Debug)]
pub struct QueueHistory {
    every: f64,
    capacity: usize,
    samples: VecDeque<QueueSample>,
}

impl Default for QueueHistory {
    fn default() -> QueueHistory {
        QueueHistory::new(SAMPLE_EVERY_SECS, SAMPLES_KEPT)
    }
}

impl QueueHistory {
    pub fn new(every: f64, capacity: usize) -> QueueHistory {
        QueueHistory {
            every,
            capacity: capacity.max(1),
            samples: VecDeque::new(),
        }
    }

    /// Keeps `pending` as the sample at `at` unless the last one is less than `every`
    /// seconds old. Answers whether it was kept.
    pub fn record(&mut self, at: f64, pending: u64) -> bool {
        if self
            .samples
            .back()
            .is_some_and(|last| at - last.at < self.every)
        {
            return false;
        }
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(QueueSample { at, pending });
        true
    }

    /// The samples taken at or after `from`, oldest first.
    pub fn since(&self, from: f64) -> Vec<QueueSample> {
        self.samples
            .iter()
            .filter(|s| s.at >= from)
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_at_most_once_per_interval() {
        let mut h = QueueHistory::new(10.0, 100);
        assert!(h.record(100.0, 3));
        assert!(!h.record(105.0, 4));
        assert!(h.record(110.0, 5));
        assert_eq!(
            h.since(0.0),
            vec![
                QueueSample {
                    at: 100.0,
                    pending: 3
                },
                QueueSample {
                    at: 110.0,
                    pending: 5
                }
            ]
        );
        assert_eq!(h.since(101.0).len(), 1);
    }

    #[test]
    fn memory_is_bounded() {
        let mut h = QueueHistory::new(1.0, 3);
        for i in 0..10 {
            h.record(i as f64, i);
        }
        let kept: Vec<u64> = h.since(0.0).iter().map(|s| s.pending).collect();
        assert_eq!(kept, vec![7, 8, 9]);
    }
}

//! Event streams are long-lived: each holds a connection and a subscription. They are capped
//! per API key and in all, and a stream over a cap is refused at once with `Retry-After`.

use crate::ApiError;
use sparkle_core::ErrorCode;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The streams open now.
#[derive(Debug)]
pub struct StreamPermits {
    total: usize,
    per_key: usize,
    open: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_key: HashMap<String, usize>,
}

/// One open stream; its place is given back when it is dropped.
#[derive(Debug)]
pub struct StreamPermit {
    permits: Arc<StreamPermits>,
    key: String,
}

/// Seconds a refused stream is asked to wait.
const RETRY_AFTER_SECS: u64 = 5;

impl StreamPermits {
    pub fn new(total: usize, per_key: usize) -> Arc<StreamPermits> {
        Arc::new(StreamPermits {
            total,
            per_key,
            open: Mutex::new(Counts::default()),
        })
    }

    /// A place for one more stream of `key`, or the refusal that says which cap is reached.
    pub fn open(self: &Arc<Self>, key: &str) -> Result<StreamPermit, ApiError> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| ApiError::new(ErrorCode::Internal, "the stream table is unusable"))?;
        if open.total >= self.total {
            return Err(ApiError::new(
                ErrorCode::TooManyStreams,
                format!(
                    "{} event streams are open (the limit is {}); retry shortly",
                    open.total, self.total
                ),
            )
            .retry_after(RETRY_AFTER_SECS));
        }
        let mine = open.by_key.get(key).copied().unwrap_or(0);
        if mine >= self.per_key {
            return Err(ApiError::new(
                ErrorCode::TooManyStreams,
                format!(
                    "this key has {mine} event streams open (the limit is {}); close one first",
                    self.per_key
                ),
            )
            .retry_after(RETRY_AFTER_SECS));
        }
        open.total += 1;
        *open.by_key.entry(key.to_string()).or_default() += 1;
        metrics::gauge!("sparkle_event_streams").set(open.total as f64);
        Ok(StreamPermit {
            permits: self.clone(),
            key: key.to_string(),
        })
    }

    /// Streams open now.
    pub fn open_now(&self) -> usize {
        self.open.lock().map(|o| o.total).unwrap_or(0)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Ok(mut open) = self.permits.open.lock() {
            open.total = open.total.saturating_sub(1);
            if let Some(n) = open.by_key.get_mut(&self.key) {
                *n -= 1;
                if *n == 0 {
                    open.by_key.remove(&self.key);
                }
            }
            metrics::gauge!("sparkle_event_streams").set(open.total as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_capped_per_key_and_in_all_and_closing_one_frees_its_place() {
        let permits = StreamPermits::new(3, 2);
        let a1 = permits.open("a").expect("first");
        let _a2 = permits.open("a").expect("second");
        let refused = permits.open("a").expect_err("a third for one key");
        assert_eq!(refused.code, ErrorCode::TooManyStreams);
        assert!(
            refused.message.contains("limit is 2"),
            "{}",
            refused.message
        );
        let _b1 = permits.open("b").expect("another key");
        let refused = permits.open("c").expect_err("over the total");
        assert!(
            refused.message.contains("limit is 3"),
            "{}",
            refused.message
        );
        assert_eq!(refused.retry_after_secs, Some(RETRY_AFTER_SECS));
        drop(a1);
        assert_eq!(permits.open_now(), 2);
        permits.open("c").expect("a place was freed");
    }
}

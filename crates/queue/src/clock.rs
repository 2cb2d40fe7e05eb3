use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where backends take time from, so that tests can move it by hand, to the millisecond,
/// across a lease's boundary, and make the wall clock jump.
///
/// Two clocks: the wall clock (milliseconds since the Unix epoch) dates what clients see
/// (when a job was created, started, finished) and when a retry is due; leases are counted on
/// a monotonic clock that no wall-clock jump moves, shared by every process of the host, so a
/// clock set back or forward neither expires a live lease nor keeps a dead one alive.
pub trait Clock: Send + Sync + 'static {
    /// Wall-clock milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// Milliseconds on the host's monotonic clock since it booted (suspended time included).
    fn monotonic_ms(&self) -> i64;
    /// What names this boot of the host: the monotonic clock starts again at each boot.
    fn boot_id(&self) -> String;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn monotonic_ms(&self) -> i64 {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let id = rustix::time::ClockId::Boottime;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let id = rustix::time::ClockId::Monotonic;
        let t = rustix::time::clock_gettime(id);
        t.tv_sec.saturating_mul(1000) + t.tv_nsec / 1_000_000
    }

    fn boot_id(&self) -> String {
        // A process lives within one boot: read once.
        static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        BOOT.get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|id| id.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        })
        .clone()
    }
}

/// A clock that moves only when told to. [`advance_ms`](ManualClock::advance_ms) moves time
/// on; [`jump_wall_ms`](ManualClock::jump_wall_ms) makes only the wall clock jump; [`reboot`](ManualClock::reboot)
/// starts a new boot.
#[derive(Debug, Clone)]
pub struct ManualClock {
    wall: Arc<AtomicI64>,
    monotonic: Arc<AtomicI64>,
    boot: Arc<Mutex<String>>,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new(0)
    }
}

impl ManualClock {
    pub fn new(start_ms: i64) -> Self {
        ManualClock {
            wall: Arc::new(AtomicI64::new(start_ms)),
            monotonic: Arc::new(AtomicI64::new(1_000)),
            boot: Arc::new(Mutex::new("boot-1".into())),
        }
    }

    /// Time passes: both clocks move on.
    pub fn advance_ms(&self, ms: i64) {
        self.wall.fetch_add(ms, Ordering::SeqCst);
        self.monotonic.fetch_add(ms, Ordering::SeqCst);
    }

    /// Time passes until the wall clock reads `ms` (both clocks move by the difference).
    pub fn set_ms(&self, ms: i64) {
        let delta = ms - self.wall.swap(ms, Ordering::SeqCst);
        self.monotonic.fetch_add(delta, Ordering::SeqCst);
    }

    /// The wall clock is set to `ms` (by an operator, or NTP stepping it); no time passes.
    pub fn jump_wall_ms(&self, ms: i64) {
        self.wall.store(ms, Ordering::SeqCst);
    }

    /// The host boots again: a new boot id, the monotonic clock from near zero.
    pub fn reboot(&self) {
        let mut boot = self.boot.lock().unwrap_or_else(|e| e.into_inner());
        let next = boot
            .strip_prefix("boot-")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        *boot = format!("boot-{next}");
        self.monotonic.store(1_000, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.wall.load(Ordering::SeqCst)
    }

    fn monotonic_ms(&self) -> i64 {
        self.monotonic.load(Ordering::SeqCst)
    }

    fn boot_id(&self) -> String {
        self.boot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Now on a host's lease clock: its monotonic clock plus an offset per boot, which the
/// backend records in its database (past every lease written before, so a lease from an
/// earlier boot has expired). The offset is asked for once per boot and kept.
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaseEpoch(Arc<Mutex<Option<(String, i64)>>>);

impl LeaseEpoch {
    /// `offset_of(boot)` records or reads the offset of a boot not seen yet.
    pub async fn now<F, Fut>(
        &self,
        clock: &dyn Clock,
        offset_of: F,
    ) -> Result<i64, crate::QueueError>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<i64, crate::QueueError>>,
    {
        let boot = clock.boot_id();
        let known = {
            let epoch = self.0.lock().unwrap_or_else(|e| e.into_inner());
            epoch
                .as_ref()
                .filter(|(b, _)| *b == boot)
                .map(|(_, offset)| *offset)
        };
        let offset = match known {
            Some(offset) => offset,
            None => {
                let offset = offset_of(boot.clone()).await?;
                *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((boot, offset));
                offset
            }
        };
        Ok(offset.saturating_add(clock.monotonic_ms()))
    }
}

//! Job events, pushed: one watcher per process follows the queue's change counter and hands
//! each change to whoever subscribed to that job.
//!
//! The watcher asks the queue for jobs changed since the last revision it saw — after this
//! process's own commits at once, and every `poll` for other processes' (one indexed query,
//! however many clients listen). Only jobs someone follows are read back. Queue positions
//! change when other jobs move, so they are recomputed for every followed queued job in one
//! read of the queue, when the queue changed and at most every `positions_every` — never per
//! client per tick. A subscriber holds a `watch` receiver: it sees the latest state, and a
//! slow one skips intermediate steps instead of piling them up.

use sparkle_core::{JobId, JobStatus};
use sparkle_queue::{Job, JobQueue, QueueError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A job as a subscriber sees it: its state, and where it stands while queued.
#[derive(Debug, Clone)]
pub struct JobUpdate {
    pub job: Arc<Job>,
    /// Jobs that will be leased before it (queued jobs only).
    pub position: Option<u64>,
    /// Seconds until it is likely done (queued jobs only, once run times are known).
    pub eta_secs: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct EventOptions {
    /// How often other processes' commits are looked for.
    pub poll: Duration,
    /// Least time between two recomputations of queue positions.
    pub positions_every: Duration,
}

impl Default for EventOptions {
    fn default() -> Self {
        EventOptions {
            poll: Duration::from_millis(100),
            positions_every: Duration::from_millis(500),
        }
    }
}

/// The subscriptions of one process, and the watcher that feeds them.
pub struct JobEvents {
    queue: Arc<dyn JobQueue>,
    options: EventOptions,
    followed: Mutex<HashMap<JobId, watch::Sender<JobUpdate>>>,
    /// Woken after every batch of changes: delivery loops look for due work.
    any: Notify,
}

impl std::fmt::Debug for JobEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobEvents")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// One subscriber's view of one job; unsubscribes when dropped.
pub struct Subscription {
    rx: watch::Receiver<JobUpdate>,
    id: JobId,
    events: Arc<JobEvents>,
}

impl Subscription {
    /// The latest state.
    pub fn current(&self) -> JobUpdate {
        self.rx.borrow().clone()
    }

    /// Waits for the next change and returns the state then; `None` when the watcher stopped.
    pub async fn next(&mut self) -> Option<JobUpdate> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut followed) = self.events.followed.lock() {
            // This receiver still counts until it is dropped, after this body.
            if followed
                .get(&self.id)
                .is_some_and(|tx| tx.receiver_count() <= 1)
            {
                followed.remove(&self.id);
            }
        }
    }
}

impl JobEvents {
    pub fn new(queue: Arc<dyn JobQueue>, options: EventOptions) -> Arc<JobEvents> {
        Arc::new(JobEvents {
            queue,
            options,
            followed: Mutex::new(HashMap::new()),
            any: Notify::new(),
        })
    }

    /// How many jobs are followed now.
    pub fn followed(&self) -> usize {
        self.followed.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Follows job `id`: `None` if there is no such job.
    pub async fn subscribe(
        self: &Arc<Self>,
        id: JobId,
    ) -> Result<Option<Subscription>, QueueError> {
        // Registered before the first read, so no change between the two is missed.
        let placeholder = {
            let followed = self.followed.lock().map_err(|_| poisoned())?;
            followed.get(&id).map(|tx| tx.subscribe())
        };
        let rx = match placeholder {
            Some(rx) => rx,
            None => {
                let Some(job) = self.queue.get(id).await? else {
                    return Ok(None);
                };
                let mut update = JobUpdate {
                    job: Arc::new(job),
                    position: None,
                    eta_secs: None,
                };
                if update.job.status == JobStatus::Queued {
                    update.position = self.queue.position(id).await?;
                    update.eta_secs = eta(&*self.queue, update.position).await;
                }
                let mut followed = self.followed.lock().map_err(|_| poisoned())?;
                match followed.get(&id) {
                    // Someone subscribed meanwhile: keep whichever state is newer.
                    Some(tx) => {
                        tx.send_if_modified(|current| newer(current, &update));
                        tx.subscribe()
                    }
                    None => {
                        let (tx, rx) = watch::channel(update);
                        followed.insert(id, tx);
                        rx
                    }
                }
            }
        };
        let mut subscription = Subscription {
            rx,
            id,
            events: self.clone(),
        };
        subscription.rx.mark_unchanged();
        // A change committed between the watcher's last look and the registration is
        // caught by reading the job once more now.
        self.publish_current([id]).await?;
        Ok(Some(subscription))
    }

    /// Waits until the watcher has seen some change (or `timeout` passes).
    pub async fn changed(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.any.notified()).await;
    }

    /// Follows the queue's changes until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut seen = loop {
            match self.queue.revision().await {
                Ok(revision) => break revision,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the job change counter");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        // Whoever subscribed before that baseline may hold a state or a place that changed
        // before it, which no later change would report: read their jobs again now, and
        // place them anew on the first pass.
        if let Err(e) = self.reread_followed().await {
            tracing::warn!(error = %e, "cannot read the followed jobs");
        }
        let mut positions_due = Some(Instant::now());
        let mut positions_at = Instant::now() - self.options.positions_every;
        loop {
            let wait = match positions_due {
                Some(due) => due
                    .saturating_duration_since(Instant::now())
                    .min(self.options.poll),
                None => self.options.poll,
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.queue.wait_for_change(wait) => {}
            }
            match self.drain_changes(seen).await {
                Ok((revision, queue_moved)) => {
                    if revision != seen {
                        seen = revision;
                        self.any.notify_waiters();
                    }
                    if queue_moved && positions_due.is_none() {
                        positions_due = Some(positions_at + self.options.positions_every);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read job changes"),
            }
            if positions_due.is_some_and(|due| Instant::now() >= due) {
                positions_due = None;
                positions_at = Instant::now();
                if let Err(e) = self.refresh_positions().await {
                    tracing::warn!(error = %e, "cannot compute queue positions");
                }
            }
        }
        // Subscribers see the end: their `next` returns None.
        if let Ok(mut followed) = self.followed.lock() {
            followed.clear();
        }
    }

    /// Reads every change after `seen` and publishes the followed jobs'; returns the last
    /// revision seen and whether any change may have moved queue positions.
    async fn drain_changes(&self, mut seen: u64) -> Result<(u64, bool), QueueError> {
        const BATCH: usize = 1000;
        let mut queue_moved = false;
        loop {
            let changes = self.queue.changed_since(seen, BATCH).await?;
            let Some(&(_, last)) = changes.last() else {
                return Ok((seen, queue_moved));
            };
            seen = last;
            metrics::counter!("sparkle_job_events_total").increment(changes.len() as u64);
            // Any change can move a queued job: an enqueue, a lease, a cancel.
            queue_moved = true;
            let wanted: Vec<JobId> = {
                let followed = self.followed.lock().map_err(|_| poisoned())?;
                changes
                    .iter()
                    .map(|(id, _)| *id)
                    .filter(|id| followed.contains_key(id))
                    .collect()
            };
            self.publish_current(wanted).await?;
            if changes.len() < BATCH {
                return Ok((seen, queue_moved));
            }
        }
    }

    /// Reads every followed job once more and publishes what changed.
    async fn reread_followed(&self) -> Result<(), QueueError> {
        let ids: Vec<JobId> = {
            let followed = self.followed.lock().map_err(|_| poisoned())?;
            followed.keys().copied().collect()
        };
        self.publish_current(ids).await
    }

    /// Reads each of `ids` as it stands and publishes it (to its subscribers, if newer).
    async fn publish_current(
        &self,
        ids: impl IntoIterator<Item = JobId>,
    ) -> Result<(), QueueError> {
        for id in ids {
            if let Some(job) = self.queue.get(id).await? {
                self.publish(Arc::new(job), None);
            }
        }
        Ok(())
    }

    /// Recomputes the position of every followed queued job, in one read of the queue.
    async fn refresh_positions(&self) -> Result<(), QueueError> {
        let queued: Vec<(JobId, Arc<Job>)> = {
            let followed = self.followed.lock().map_err(|_| poisoned())?;
            followed
                .iter()
                .map(|(id, tx)| (*id, tx.borrow().job.clone()))
                .filter(|(_, job)| job.status == JobStatus::Queued)
                .collect()
        };
        if queued.is_empty() {
            return Ok(());
        }
        let ids: Vec<JobId> = queued.iter().map(|(id, _)| *id).collect();
        let positions = self.queue.positions(&ids).await?;
        let stats = self.queue.stats().await?;
        for ((_, job), position) in queued.into_iter().zip(positions) {
            let eta_secs = position.and_then(|ahead| eta_from(&stats, ahead));
            self.publish(job, Some((position, eta_secs)));
        }
        Ok(())
    }

    /// Hands `job` to its subscribers if it is newer than what they have (or, with
    /// `position`, the same revision placed anew).
    fn publish(&self, job: Arc<Job>, position: Option<(Option<u64>, Option<f64>)>) {
        let Ok(followed) = self.followed.lock() else {
            return;
        };
        let Some(tx) = followed.get(&job.id) else {
            return;
        };
        tx.send_if_modified(|current| {
            if job.revision < current.job.revision {
                return false;
            }
            let (position, eta_secs) = match position {
                Some(placed) => placed,
                // A new state keeps the last known place until positions are recomputed.
                None if job.status == JobStatus::Queued => (current.position, current.eta_secs),
                None => (None, None),
            };
            let changed = job.revision > current.job.revision
                || position != current.position
                || eta_secs != current.eta_secs;
            if changed {
                *current = JobUpdate {
                    job: job.clone(),
                    position,
                    eta_secs,
                };
            }
            changed
        });
    }
}

/// Replaces `current` with `update` if `update` is newer; whether it did.
fn newer(current: &mut JobUpdate, update: &JobUpdate) -> bool {
    if update.job.revision > current.job.revision {
        *current = update.clone();
        true
    } else {
        false
    }
}

async fn eta(queue: &dyn JobQueue, position: Option<u64>) -> Option<f64> {
    let ahead = position?;
    let stats = queue.stats().await.ok()?;
    eta_from(&stats, ahead)
}

/// Seconds until a job with `ahead` jobs before it is likely done: its turn and its own run,
/// at the recent run time, spread over the workers running now.
pub fn eta_from(stats: &sparkle_queue::QueueStats, ahead: u64) -> Option<f64> {
    let run_ms = stats.recent_run_ms?;
    let workers = stats.running.max(1) as f64;
    Some(((ahead as f64 + 1.0) * run_ms / workers / 1000.0).ceil())
}

fn poisoned() -> QueueError {
    QueueError::Corrupt {
        id: "job events".into(),
        reason: "a subscriber panicked while holding the subscription table".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkle_queue::conformance::new_job;
    use sparkle_queue::{Field, FieldCipher, FieldError, SqliteOptions, SqliteQueue};
    use zeroize::Zeroizing;

    /// Not a cipher: these tests are about events, not sealing.
    struct Clear;

    impl FieldCipher for Clear {
        fn seal(&self, _: Field, _: &str, plain: &[u8]) -> Result<String, FieldError> {
            Ok(format!("c.{}", String::from_utf8_lossy(plain)))
        }
        fn open(&self, _: Field, _: &str, sealed: &str) -> Result<Zeroizing<Vec<u8>>, FieldError> {
            Ok(Zeroizing::new(
                sealed.trim_start_matches("c.").as_bytes().to_vec(),
            ))
        }
        fn blind(&self, _: Field, value: &[u8]) -> String {
            String::from_utf8_lossy(value).into_owned()
        }
        fn key_of(&self, _: &str) -> Option<String> {
            Some("clear".into())
        }
        fn active_key(&self) -> String {
            "clear".into()
        }
    }

    /// Two queues on one file stand for two processes: the gateway that follows (with its
    /// events, polling often), and a worker whose commits it only sees through the change
    /// counter. Two jobs queued, the first first.
    struct TwoProcesses {
        _dir: tempfile::TempDir,
        worker: SqliteQueue,
        events: Arc<JobEvents>,
        jobs: Vec<Job>,
    }

    async fn two_processes() -> TwoProcesses {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.db");
        let gateway = Arc::new(
            SqliteQueue::open(&path, &SqliteOptions::default(), Arc::new(Clear))
                .await
                .expect("open"),
        );
        let worker = SqliteQueue::open(&path, &SqliteOptions::default(), Arc::new(Clear))
            .await
            .expect("open again");
        let mut jobs = Vec::new();
        for prompt in ["one", "two"] {
            let job = gateway.enqueue(new_job("alice", prompt)).await;
            jobs.push(job.expect("enqueue").job);
        }
        let events = JobEvents::new(
            gateway,
            EventOptions {
                poll: Duration::from_millis(20),
                positions_every: Duration::from_millis(20),
            },
        );
        TwoProcesses {
            _dir: dir,
            worker,
            events,
            jobs,
        }
    }

    /// The worker's lease of the next job in line.
    async fn lease_one(worker: &SqliteQueue) -> sparkle_queue::Lease {
        worker
            .lease("w", 1, Duration::from_secs(30))
            .await
            .expect("lease")
            .pop()
            .expect("leased")
    }

    async fn next_within(sub: &mut Subscription) -> JobUpdate {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("an update within 5 s")
            .expect("the watcher runs")
    }

    #[tokio::test]
    async fn another_process_s_changes_and_queue_moves_reach_subscribers() {
        let p = two_processes().await;
        let (worker, events, jobs) = (&p.worker, &p.events, &p.jobs);
        let (first, second) = (&jobs[0], &jobs[1]);
        let shutdown = CancellationToken::new();
        let watcher = tokio::spawn(events.clone().run(shutdown.clone()));
        let mut sub = events
            .subscribe(second.id)
            .await
            .expect("subscribe")
            .expect("job");
        assert_eq!(sub.current().position, Some(1));
        assert!(events
            .subscribe(JobId::random())
            .await
            .expect("subscribe")
            .is_none());

        // The worker leases the first job: the second one moves up, though it did not change.
        let lease = lease_one(worker).await;
        assert_eq!(lease.job.id, first.id);
        let moved = next_within(&mut sub).await;
        assert_eq!(
            (moved.job.status, moved.position),
            (JobStatus::Queued, Some(0))
        );

        // Its own lease, progress and completion come through in order.
        let mine = lease_one(worker).await;
        let running = next_within(&mut sub).await;
        assert_eq!(
            (running.job.status, running.position),
            (JobStatus::Running, None)
        );
        worker
            .heartbeat(
                &mine.token,
                Some(sparkle_core::Progress { step: 1, total: 2 }),
                Duration::from_secs(30),
            )
            .await
            .expect("beat");
        let stepped = next_within(&mut sub).await;
        assert_eq!(stepped.job.progress.map(|p| p.step), Some(1));
        worker.complete(&mine.token, 1).await.expect("complete");
        let done = next_within(&mut sub).await;
        assert_eq!(done.job.status, JobStatus::Succeeded);

        let followed_before = events.followed();
        drop(sub);
        assert_eq!(
            events.followed(),
            followed_before - 1,
            "a dropped subscription unfollows"
        );
        shutdown.cancel();
        watcher.await.expect("watcher stops");
    }

    /// Subscribers who came before the watcher took its first look at the change counter
    /// still hear of what changed in between: a state and a place no later change reports.
    #[tokio::test]
    async fn changes_before_the_watcher_starts_reach_subscribers() {
        let p = two_processes().await;
        let (worker, events, jobs) = (&p.worker, &p.events, &p.jobs);
        let subscribe = |id| {
            let events = events.clone();
            async move {
                let sub = events.subscribe(id).await.expect("subscribe");
                sub.expect("job")
            }
        };
        let mut first = subscribe(jobs[0].id).await;
        let mut second = subscribe(jobs[1].id).await;
        assert_eq!(second.current().position, Some(1));
        // Leased before the watcher runs: its baseline already counts this change.
        let lease = lease_one(worker).await;
        assert_eq!(lease.job.id, jobs[0].id);
        let shutdown = CancellationToken::new();
        let watcher = tokio::spawn(events.clone().run(shutdown.clone()));
        assert_eq!(next_within(&mut first).await.job.status, JobStatus::Running);
        let moved = next_within(&mut second).await;
        assert_eq!(
            (moved.job.status, moved.position),
            (JobStatus::Queued, Some(0))
        );
        shutdown.cancel();
        watcher.await.expect("watcher stops");
    }
}

//! Retention: finished jobs are removed `retention.days` after they finished, with their
//! images; images no job keeps (written by an attempt that lost its lease, or left by a
//! process stopped between deleting a job and its images) are swept, as are source images
//! of jobs that were never created.

use sparkle_queue::{JobQueue, KeptImages};
use sparkle_store::ImageStore;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Jobs removed per transaction.
const PURGE_BATCH: u32 = 500;
/// Images younger than this are never swept: an attempt may still be storing them.
pub const SWEEP_GRACE: Duration = Duration::from_secs(3600);

/// What one pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub jobs: u64,
    pub images: u64,
    pub orphans: u64,
}

/// Removes the jobs that finished before `horizon_ms`, and their images.
pub async fn purge(
    queue: &dyn JobQueue,
    store: &dyn ImageStore,
    horizon_ms: i64,
) -> anyhow::Result<Pass> {
    let mut pass = Pass::default();
    loop {
        let removed = queue.purge_finished(horizon_ms, PURGE_BATCH).await?;
        for id in &removed {
            // The record is gone: should this fail, the sweep removes the images.
            match store.delete_job(*id).await {
                Ok(n) => pass.images += n,
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "could not remove a purged job's images")
                }
            }
        }
        pass.jobs += removed.len() as u64;
        if removed.len() < PURGE_BATCH as usize {
            return Ok(pass);
        }
    }
}

/// Removes every stored image written before `before_ms` that its job does not keep.
pub async fn sweep(
    queue: &dyn JobQueue,
    store: &dyn ImageStore,
    before_ms: i64,
) -> anyhow::Result<u64> {
    // Listed first, judged after: an image stored after the listing is not touched, and one
    // listed was stored before its job's state is read.
    let mut by_job: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for image in store.list().await? {
        if image.modified_ms < before_ms {
            by_job
                .entry(image.key.job.to_string())
                .or_default()
                .push(image);
        }
    }
    let mut removed = 0;
    let jobs: Vec<_> = by_job.values().map(|images| images[0].key.job).collect();
    for chunk in jobs.chunks(256) {
        let kept = queue.kept_images(chunk).await?;
        for (job, kept) in chunk.iter().zip(kept) {
            let attempts: std::collections::BTreeSet<_> = by_job[&job.to_string()]
                .iter()
                .map(|image| image.attempt)
                .collect();
            for attempt in attempts {
                if kept == KeptImages::Attempt(attempt) {
                    continue;
                }
                removed += store.delete_attempt(*job, attempt).await?;
            }
        }
    }
    // Source images stored for a job that was never created (its submission refused or
    // interrupted between storing the source and enqueuing the job).
    for (job, modified_ms) in store.list_sources().await? {
        if modified_ms < before_ms && queue.get(job).await?.is_none() {
            store.delete_job(job).await?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Runs a pass every `interval` until `shutdown`.
pub async fn run(
    queue: Arc<dyn JobQueue>,
    store: Arc<dyn ImageStore>,
    days: u64,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let now = unix_ms();
        let mut pass = Pass::default();
        if days > 0 {
            let horizon = now.saturating_sub((days as i64).saturating_mul(86_400_000));
            match purge(queue.as_ref(), store.as_ref(), horizon).await {
                Ok(p) => pass = p,
                Err(e) => tracing::warn!(error = %e, "retention pass failed"),
            }
        }
        match sweep(
            queue.as_ref(),
            store.as_ref(),
            now - SWEEP_GRACE.as_millis() as i64,
        )
        .await
        {
            Ok(n) => pass.orphans = n,
            Err(e) => tracing::warn!(error = %e, "orphan sweep failed"),
        }
        if pass != Pass::default() {
            tracing::info!(
                jobs = pass.jobs,
                images = pass.images,
                orphans = pass.orphans,
                "retention pass"
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

fn unix_ms() -> i64 {
    sparkle_queue::Clock::now_ms(&sparkle_queue::SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sparkle_queue::conformance::new_job;
    use sparkle_queue::{CancelOutcome, ManualClock, SqliteOptions, SqliteQueue};
    use sparkle_seal::{Keyring, MasterKeys};
    use sparkle_store::{ImageKey, ObjectImageStore};

    const T0: i64 = 1_700_000_000_000;

    async fn fixture(dir: &std::path::Path) -> (SqliteQueue, ManualClock, ObjectImageStore) {
        let clock = ManualClock::new(T0);
        let keys = Arc::new(MasterKeys::fixed(Keyring::generate(1)));
        let fields = Arc::new(crate::keyring::SealedFields(keys.clone()));
        let queue = SqliteQueue::open_with_clock(
            &dir.join("db.sqlite"),
            &SqliteOptions::default(),
            Arc::new(clock.clone()),
            fields,
        )
        .await
        .expect("queue");
        let store = ObjectImageStore::local(&dir.join("images"), keys).expect("store");
        (queue, clock, store)
    }

    fn image(job: sparkle_core::JobId) -> ImageKey {
        ImageKey { job, index: 0 }
    }

    #[tokio::test]
    async fn the_sweep_keeps_completed_and_running_attempts_and_removes_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (queue, clock, store) = fixture(dir.path()).await;
        let png = || Bytes::from_static(b"png");
        let lease = |q: &SqliteQueue| {
            let q = q.clone();
            async move {
                q.lease("w", 1, Duration::from_secs(60))
                    .await
                    .expect("lease")
                    .pop()
                    .expect("leased")
            }
        };

        // Completed by its second attempt; the first, which lost its lease, wrote late.
        let done = queue
            .enqueue(new_job("a", "done"))
            .await
            .expect("enqueue")
            .job
            .id;
        let first = lease(&queue).await;
        clock.advance_ms(61_000);
        queue.reclaim_expired().await.expect("reclaim");
        clock.advance_ms(300_000);
        let second = lease(&queue).await;
        assert_eq!((first.job.id, second.job.id), (done, done));
        store.put(image(done), Some(2), png()).await.expect("put");
        queue.complete(&second.token, 1).await.expect("complete");
        store
            .put(image(done), Some(1), png())
            .await
            .expect("late put");

        // Running now, its images stored but not yet completed.
        let running = queue
            .enqueue(new_job("b", "running"))
            .await
            .expect("enqueue")
            .job
            .id;
        let held = lease(&queue).await;
        assert_eq!(held.job.id, running);
        store
            .put(image(running), Some(1), png())
            .await
            .expect("put");

        // Cancelled after its images were stored, and a job that no longer exists.
        let cancelled = queue
            .enqueue(new_job("c", "cancelled"))
            .await
            .expect("enqueue")
            .job
            .id;
        let third = lease(&queue).await;
        store
            .put(image(cancelled), Some(third.job.attempts), png())
            .await
            .expect("put");
        assert_eq!(
            queue.cancel(cancelled).await.expect("cancel"),
            CancelOutcome::Cancelled
        );
        let gone = sparkle_core::JobId::random();
        store.put(image(gone), None, png()).await.expect("put");
        // Source images: one of a running job, one stored for a job never created.
        store.put_source(running, png()).await.expect("source");
        store
            .put_source(sparkle_core::JobId::random(), png())
            .await
            .expect("source");

        // Too young: nothing is touched.
        assert_eq!(
            sweep(&queue, &store, unix_ms() - 3_600_000)
                .await
                .expect("sweep"),
            0
        );
        assert_eq!(store.list().await.expect("list").len(), 5);

        assert_eq!(
            sweep(&queue, &store, unix_ms() + 1).await.expect("sweep"),
            4
        );
        let sources: Vec<_> = store
            .list_sources()
            .await
            .expect("sources")
            .into_iter()
            .map(|(job, _)| job)
            .collect();
        assert_eq!(sources, vec![running]);
        let mut left: Vec<_> = store
            .list()
            .await
            .expect("list")
            .into_iter()
            .map(|i| (i.key.job, i.attempt))
            .collect();
        left.sort_by_key(|(job, _)| job.to_string());
        let mut expected = vec![(done, Some(2)), (running, Some(1))];
        expected.sort_by_key(|(job, _)| job.to_string());
        assert_eq!(left, expected);
        assert!(store
            .get(image(done), Some(2))
            .await
            .expect("get")
            .is_some());
    }

    #[tokio::test]
    async fn purging_removes_old_finished_jobs_with_their_images() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (queue, clock, store) = fixture(dir.path()).await;
        let old = queue
            .enqueue(new_job("a", "old"))
            .await
            .expect("enqueue")
            .job
            .id;
        let lease = queue
            .lease("w", 1, Duration::from_secs(60))
            .await
            .expect("lease")
            .pop()
            .expect("leased");
        store
            .put(image(old), Some(1), Bytes::from_static(b"png"))
            .await
            .expect("put");
        queue.complete(&lease.token, 1).await.expect("complete");
        let live = queue
            .enqueue(new_job("b", "live"))
            .await
            .expect("enqueue")
            .job
            .id;
        clock.advance_ms(31 * 86_400_000);
        let horizon = T0 + 86_400_000;
        let pass = purge(&queue, &store, horizon).await.expect("purge");
        assert_eq!(
            pass,
            Pass {
                jobs: 1,
                images: 1,
                orphans: 0
            }
        );
        assert!(queue.get(old).await.expect("get").is_none());
        assert!(queue.get(live).await.expect("get").is_some());
        assert!(store.list().await.expect("list").is_empty());
    }
}

use crate::gpus::Gpu;
use crate::{Actuator, ScalerError};
use async_trait::async_trait;
use std::collections::HashMap;
use std::ffi::OsString;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, ChildStdout, Command};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads a worker's standard output to its end; the ready line marks it ready.
async fn watch_ready(
    pid: u32,
    stdout: ChildStdout,
    unready: Arc<Mutex<HashMap<u32, Instant>>>,
    ready_times: Arc<Mutex<Vec<f64>>>,
) {
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim() == crate::READY_LINE {
            if let Some(started) = lock(&unready).remove(&pid) {
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(pid, secs, "worker ready");
                lock(&ready_times).push(secs);
            }
        }
    }
    lock(&unready).remove(&pid);
}

/// Workers as child processes of this one: one per GPU, each pinned to its GPU, or CPU
/// workers where there is none (as many as the policy asks for: `scaler.max_workers`).
///
/// Each worker gets a pipe as its standard input and treats end-of-file as the signal to
/// drain and exit: closing the pipe stops it gracefully, and if this process dies for any
/// reason the kernel closes the pipe, so no worker outlives its parent.
pub struct LocalProcesses {
    program: OsString,
    args: Vec<OsString>,
    gpus: Vec<Gpu>,
    /// Each running worker and the GPU (an index into `gpus`) it holds.
    children: Vec<(Child, Option<usize>)>,
    stopping: Vec<Child>,
    /// Workers started and not yet ready, by process id.
    unready: Arc<Mutex<HashMap<u32, Instant>>>,
    /// Seconds each worker took to be ready, not yet taken by the scaler.
    ready_times: Arc<Mutex<Vec<f64>>>,
}

impl LocalProcesses {
    /// Workers on the CPU.
    pub fn new(program: impl Into<OsString>, args: Vec<OsString>) -> Self {
        LocalProcesses {
            program: program.into(),
            args,
            gpus: Vec::new(),
            children: Vec::new(),
            stopping: Vec::new(),
            unready: Arc::default(),
            ready_times: Arc::default(),
        }
    }

    /// One worker per GPU of `gpus` at most, each seeing its own alone
    /// (`CUDA_VISIBLE_DEVICES` set to its UUID) as `cuda:0`. No GPUs: CPU workers.
    pub fn on_gpus(mut self, gpus: Vec<Gpu>) -> Self {
        self.gpus = gpus;
        self
    }

    /// How many workers this host can run at once: one per GPU (no limit on the CPU).
    pub fn capacity(&self) -> u32 {
        if self.gpus.is_empty() {
            u32::MAX
        } else {
            self.gpus.len() as u32
        }
    }

    /// Process ids of the running workers.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(|(c, _)| c.id()).collect()
    }

    fn free_gpu(&self) -> Option<usize> {
        (0..self.gpus.len()).find(|i| !self.children.iter().any(|(_, g)| *g == Some(*i)))
    }

    fn reap(&mut self) {
        self.children
            .retain_mut(|(child, _)| match child.try_wait() {
                Ok(Some(status)) => {
                    tracing::warn!(pid = ?child.id(), %status, "worker exited");
                    false
                }
                Ok(None) => true,
                Err(_) => false,
            });
        self.stopping
            .retain_mut(|child| matches!(child.try_wait(), Ok(None)));
    }
}

#[async_trait]
impl Actuator for LocalProcesses {
    async fn current(&mut self) -> u32 {
        self.reap();
        self.children.len() as u32
    }

    async fn starting(&mut self) -> u32 {
        let unready = lock(&self.unready);
        self.children
            .iter()
            .filter(|(c, _)| c.id().is_some_and(|pid| unready.contains_key(&pid)))
            .count() as u32
    }

    async fn ready_times(&mut self) -> Vec<f64> {
        std::mem::take(&mut *lock(&self.ready_times))
    }

    async fn scale_to(&mut self, desired: u32) -> Result<(), ScalerError> {
        self.reap();
        let desired = desired.min(self.capacity());
        while (self.children.len() as u32) < desired {
            let gpu = self.free_gpu();
            let mut command = Command::new(&self.program);
            command
                .args(&self.args)
                .stdin(Stdio::piped())
                .kill_on_drop(true);
            if let Some(i) = gpu {
                command
                    .env("CUDA_VISIBLE_DEVICES", &self.gpus[i].uuid)
                    .env("SPARKLE_WORKER__DEVICE", "cuda:0");
            }
            // A start's ready time counts from before the process is made.
            let asked = Instant::now();
            let mut child = command
                .stdout(Stdio::piped())
                .spawn()
                .map_err(ScalerError::Spawn)?;
            let on = gpu.map(|i| self.gpus[i].index);
            tracing::info!(pid = ?child.id(), gpu = ?on, "worker started");
            if let (Some(pid), Some(stdout)) = (child.id(), child.stdout.take()) {
                lock(&self.unready).insert(pid, asked);
                tokio::spawn(watch_ready(
                    pid,
                    stdout,
                    self.unready.clone(),
                    self.ready_times.clone(),
                ));
            }
            self.children.push((child, gpu));
        }
        while (self.children.len() as u32) > desired {
            let Some((mut child, _)) = self.children.pop() else {
                break;
            };
            tracing::info!(pid = ?child.id(), "stopping worker");
            drop(child.stdin.take());
            self.stopping.push(child);
        }
        Ok(())
    }

    async fn stop_all(&mut self, drain: Duration) {
        let mut all: Vec<Child> = self
            .children
            .drain(..)
            .map(|(child, _)| child)
            .chain(self.stopping.drain(..))
            .collect();
        for child in &mut all {
            drop(child.stdin.take());
        }
        for child in &mut all {
            match tokio::time::timeout(drain, child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(pid = ?child.id(), "worker did not stop in time; killing it");
                    let _ = child.kill().await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32) -> Gpu {
        Gpu {
            index,
            uuid: format!("GPU-{index:08x}-0000-0000-0000-000000000000"),
            name: "test".into(),
            memory_mib: 1024,
        }
    }

    /// A "worker" that writes what it was pinned to and waits for its input to close.
    fn recorder(dir: &std::path::Path) -> LocalProcesses {
        let script = format!(
            "echo \"[$CUDA_VISIBLE_DEVICES $SPARKLE_WORKER__DEVICE]\" > {}/$$; sleep 0.2; \
             echo {}; cat >/dev/null",
            dir.display(),
            crate::READY_LINE,
        );
        LocalProcesses::new("sh", vec!["-c".into(), script.into()])
    }

    async fn pinned(dir: &std::path::Path, want: usize) -> Vec<String> {
        for _ in 0..200 {
            let mut seen: Vec<String> = std::fs::read_dir(dir)
                .expect("dir")
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if seen.len() >= want {
                seen.sort();
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the workers never said where they run");
    }

    #[tokio::test]
    async fn one_worker_per_gpu_each_pinned_to_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut local = recorder(dir.path()).on_gpus(vec![gpu(0), gpu(1)]);
        local.scale_to(5).await.expect("scale");
        assert_eq!(local.current().await, 2, "no more workers than GPUs");
        assert_eq!(local.starting().await, 2, "not ready before they say so");
        let seen = pinned(dir.path(), 2).await;
        let mut times = Vec::new();
        for _ in 0..200 {
            times.extend(local.ready_times().await);
            if times.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(times.len(), 2, "each start timed once");
        assert!(times.iter().all(|t| *t >= 0.2), "{times:?}");
        assert_eq!(local.starting().await, 0);
        assert_eq!(
            seen,
            [
                format!("[{} cuda:0]", gpu(0).uuid),
                format!("[{} cuda:0]", gpu(1).uuid)
            ]
        );
        // A worker stopped frees its GPU for the next.
        local.scale_to(1).await.expect("scale");
        assert_eq!(local.current().await, 1);
        local.scale_to(2).await.expect("scale");
        let held: Vec<Option<usize>> = local.children.iter().map(|(_, g)| *g).collect();
        assert!(
            held.contains(&Some(0)) && held.contains(&Some(1)),
            "{held:?}"
        );
        local.stop_all(Duration::from_secs(5)).await;
        assert_eq!(local.current().await, 0);
    }

    #[tokio::test]
    async fn without_gpus_workers_run_on_the_cpu_unpinned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut local = recorder(dir.path());
        local.scale_to(2).await.expect("scale");
        assert_eq!(local.current().await, 2);
        assert_eq!(pinned(dir.path(), 2).await, ["[ ]", "[ ]"]);
        local.stop_all(Duration::from_secs(5)).await;
    }
}

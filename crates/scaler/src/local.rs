use crate::{Actuator, ScalerError};
use async_trait::async_trait;
use std::ffi::OsString;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// Workers as child processes of this one.
///
/// Each worker gets a pipe as its standard input and treats end-of-file as the signal to
/// drain and exit: closing the pipe stops it gracefully, and if this process dies for any
/// reason the kernel closes the pipe, so no worker outlives its parent.
pub struct LocalProcesses {
    program: OsString,
    args: Vec<OsString>,
    children: Vec<Child>,
    stopping: Vec<Child>,
}

impl LocalProcesses {
    pub fn new(program: impl Into<OsString>, args: Vec<OsString>) -> Self {
        LocalProcesses {
            program: program.into(),
            args,
            children: Vec::new(),
            stopping: Vec::new(),
        }
    }

    /// Process ids of the running workers.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(Child::id).collect()
    }

    fn reap(&mut self) {
        self.children.retain_mut(|child| match child.try_wait() {
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

    async fn scale_to(&mut self, desired: u32) -> Result<(), ScalerError> {
        self.reap();
        while (self.children.len() as u32) < desired {
            let child = Command::new(&self.program)
                .args(&self.args)
                .stdin(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(ScalerError::Spawn)?;
            tracing::info!(pid = ?child.id(), "worker started");
            self.children.push(child);
        }
        while (self.children.len() as u32) > desired {
            let Some(mut child) = self.children.pop() else {
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

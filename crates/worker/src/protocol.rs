//! The worker protocol: a worker on any machine speaks HTTPS to the control plane's worker
//! listener, and nothing else. Every call carries a worker token (`Authorization: Bearer
//! swt1.…`), obtained with the enrollment secret and renewed before it expires.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /worker/v1/token` (enrollment secret as the bearer) | — | [`TokenGrant`] |
//! | `POST /worker/v1/capacity` | [`CapacityReport`] | 204 |
//! | `POST /worker/v1/lease` | [`LeaseAsk`] (a long poll up to `wait_ms`) | [`WireLease`]s |
//! | `POST /worker/v1/heartbeat` | [`HeartbeatReport`] | [`HeartbeatAnswer`] |
//! | `POST /worker/v1/complete?job_id=…&lease_id=…` | the PNGs, each framed by its length (u32, big-endian) | 204 |
//! | `POST /worker/v1/fail` | [`FailureReport`] | [`FailAnswer`] |
//! | `POST /worker/v1/release` | [`LeaseRef`] | 204 |
//! | `POST /worker/v1/source` | [`SourceAsk`] | the job's source image (PNG) |
//!
//! A lost lease is `409` with code `lease_lost`; an unusable token `401`; an outage `503`; a
//! worker that serves none of the deployment's models `422` with code `models_not_served`
//! (it stops). A lease ask names the models the worker serves and those it has loaded: jobs
//! of loaded models come first, and no job of a model it does not serve is ever leased.
//! Idempotency: heartbeat, fail and release change nothing the second time; a completion
//! repeated after its answer was lost succeeds again and completes nothing twice (the
//! queue recognises the lease that completed); images are named by the job, the index and
//! the attempt, so a repeated upload overwrites itself.

use crate::plane::{ControlPlane, PlaneError, Serving};
use crate::ModelLoaded;
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sparkle_core::{JobId, JobStatus, Progress};
use sparkle_queue::{Failure, HeartbeatOutcome, Job, Lease, LeaseToken};
use std::path::Path;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

pub const TOKEN: &str = "/worker/v1/token";
pub const CAPACITY: &str = "/worker/v1/capacity";
pub const LEASE: &str = "/worker/v1/lease";
pub const HEARTBEAT: &str = "/worker/v1/heartbeat";
pub const COMPLETE: &str = "/worker/v1/complete";
pub const FAIL: &str = "/worker/v1/fail";
pub const RELEASE: &str = "/worker/v1/release";
pub const SOURCE: &str = "/worker/v1/source";

/// Most jobs one lease call takes.
pub const MAX_LEASE: usize = 64;
/// Longest a lease call waits for work.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// Longest lease a worker may ask for.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(3600);

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenGrant {
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// A model the worker has loaded: the largest image it makes of it, what the load took, and
/// the models it unloaded to make room.
#[derive(Debug, Serialize, Deserialize)]
pub struct CapacityReport {
    pub worker: String,
    pub model: String,
    pub pixels: u64,
    #[serde(default)]
    pub load_secs: f64,
    #[serde(default)]
    pub evicted: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LeaseAsk {
    pub worker: String,
    /// The models the worker serves, and those of them it has loaded.
    #[serde(flatten)]
    pub models: Serving,
    #[serde(default)]
    pub batch_key: Option<String>,
    pub max: usize,
    pub visibility_ms: u64,
    pub wait_ms: u64,
}

/// A leased job as a worker needs it.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireLease {
    pub job_id: String,
    pub lease_id: String,
    pub attempts: u32,
    pub max_attempts: u32,
    /// The request, as the queue stores it ([`sparkle_queue::record::StoredRequest`]).
    pub request: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LeaseRef {
    pub job_id: String,
    pub lease_id: String,
}

/// Asks for the source image of a leased job, extending the lease as a heartbeat does.
#[derive(Debug, Serialize, Deserialize)]
pub struct SourceAsk {
    pub job_id: String,
    pub lease_id: String,
    pub visibility_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HeartbeatReport {
    pub job_id: String,
    pub lease_id: String,
    #[serde(default)]
    pub progress: Option<Progress>,
    pub visibility_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    pub cancelled: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FailureReport {
    pub job_id: String,
    pub lease_id: String,
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub detail: Option<String>,
    pub retryable: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FailAnswer {
    pub status: String,
}

/// The error body of every refusal.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireError {
    pub code: String,
    pub message: String,
}

impl WireLease {
    pub fn of(lease: &Lease) -> Result<WireLease, String> {
        Ok(WireLease {
            job_id: lease.job.id.to_string(),
            lease_id: lease.token.lease_id.clone(),
            attempts: lease.job.attempts,
            max_attempts: lease.job.max_attempts,
            request: sparkle_queue::record::StoredRequest::encode(&lease.job.request)?,
        })
    }

    /// The lease, its request validated again: a control plane is trusted with leases, not
    /// with what the engine is asked to do.
    pub fn into_lease(self) -> Result<Lease, String> {
        let id: JobId = self.job_id.parse().map_err(|_| "a malformed job id")?;
        let request = sparkle_queue::record::StoredRequest::decode(&self.request)?;
        Ok(Lease {
            token: LeaseToken {
                job_id: id,
                lease_id: self.lease_id,
            },
            job: Job {
                id,
                owner: String::new(),
                group: String::new(),
                status: JobStatus::Running,
                request,
                attempts: self.attempts,
                max_attempts: self.max_attempts,
                progress: None,
                images: 0,
                error: None,
                created_at_ms: 0,
                started_at_ms: None,
                finished_at_ms: None,
                images_attempt: None,
                revision: 0,
            },
        })
    }
}

/// The PNGs of a completion, each framed by its length.
pub fn frame_images(images: &[Bytes]) -> Bytes {
    let mut body = Vec::with_capacity(images.iter().map(|i| i.len() + 4).sum());
    for image in images {
        body.extend_from_slice(&(image.len() as u32).to_be_bytes());
        body.extend_from_slice(image);
    }
    Bytes::from(body)
}

/// The PNGs of a framed body; `None` if the framing is broken.
pub fn unframe_images(mut body: Bytes) -> Option<Vec<Bytes>> {
    let mut images = Vec::new();
    while !body.is_empty() {
        if body.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
        let _ = body.split_to(4);
        if body.len() < len {
            return None;
        }
        images.push(body.split_to(len));
    }
    Some(images)
}

/// The control plane over the worker protocol.
pub struct Remote {
    base: String,
    http: reqwest::Client,
    enrollment: zeroize::Zeroizing<String>,
    token: Mutex<Option<(zeroize::Zeroizing<String>, Instant)>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// The control plane at `base` (`https://HOST:PORT`), trusting `ca_file` or the system's
    /// roots, enrolled with `enrollment` (the secret).
    pub fn new(base: &str, ca_file: Option<&Path>, enrollment: String) -> Result<Remote, String> {
        if !base.starts_with("https://") {
            return Err("the control plane's address must start with https://".into());
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(true)
            .connect_timeout(Duration::from_secs(10))
            .timeout(MAX_WAIT + Duration::from_secs(30));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Remote {
            base: base.trim_end_matches('/').to_string(),
            http: builder.build().map_err(|e| e.to_string())?,
            enrollment: zeroize::Zeroizing::new(enrollment),
            token: Mutex::new(None),
        })
    }

    /// A live token: the one held, or a new one when it has under a third of its life left.
    async fn token(&self) -> Result<zeroize::Zeroizing<String>, PlaneError> {
        let mut held = self.token.lock().await;
        if let Some((token, renew_at)) = &*held {
            if Instant::now() < *renew_at {
                return Ok(token.clone());
            }
        }
        let answer = self
            .http
            .post(format!("{}{TOKEN}", self.base))
            .bearer_auth(self.enrollment.as_str())
            .send()
            .await
            .map_err(unreachable)?;
        let grant: TokenGrant = read(answer).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let life = Duration::from_secs(grant.expires_at.saturating_sub(now).max(0) as u64);
        let renew_at = Instant::now() + life * 2 / 3;
        let token = zeroize::Zeroizing::new(grant.token);
        *held = Some((token.clone(), renew_at));
        tracing::info!(expires_at = grant.expires_at, "worker token renewed");
        Ok(token)
    }

    /// Sends a request made by `build` with a live token; a token the control plane no
    /// longer takes (expired early, signed by a key since retired) is renewed once.
    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<T, PlaneError> {
        parse(&self.send_raw(build).await?)
    }

    /// [`Remote::send`], answered with the body as it is.
    async fn send_raw(
        &self,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<Bytes, PlaneError> {
        for renewed in [false, true] {
            let token = self.token().await?;
            let answer = build(token.as_str()).send().await.map_err(unreachable)?;
            match read_bytes(answer).await {
                Err(PlaneError::Unauthorized(_)) if !renewed => {
                    let mut held = self.token.lock().await;
                    if held.as_ref().is_some_and(|(t, _)| *t == token) {
                        *held = None;
                    }
                }
                outcome => return outcome,
            }
        }
        unreachable!("the second pass returns")
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        route: &str,
        body: &impl Serialize,
    ) -> Result<T, PlaneError> {
        let url = format!("{}{route}", self.base);
        self.send(|token| self.http.post(&url).bearer_auth(token).json(body))
            .await
    }
}

fn unreachable(e: reqwest::Error) -> PlaneError {
    PlaneError::Unavailable(e.to_string())
}

/// The answer's JSON body, or the refusal it carries.
async fn read<T: serde::de::DeserializeOwned>(answer: reqwest::Response) -> Result<T, PlaneError> {
    parse(&read_bytes(answer).await?)
}

/// A JSON body (empty reads as `null`).
fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, PlaneError> {
    let bytes = if bytes.is_empty() {
        &b"null"[..]
    } else {
        bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| PlaneError::Refused(format!("an answer this worker cannot read: {e}")))
}

/// The answer's body as it is, or the refusal it carries.
async fn read_bytes(answer: reqwest::Response) -> Result<Bytes, PlaneError> {
    let status = answer.status();
    if status.is_success() {
        return answer.bytes().await.map_err(unreachable);
    }
    let error: Option<WireError> = answer.json().await.ok();
    let message = error
        .as_ref()
        .map_or_else(|| status.to_string(), |e| e.message.clone());
    Err(
        match (status.as_u16(), error.as_ref().map(|e| e.code.as_str())) {
            (409, Some("lease_lost")) => {
                PlaneError::LeaseLost(JobId::random()) // the caller knows which job it was
            }
            (401 | 403, _) => PlaneError::Unauthorized(message),
            (422, Some("models_not_served")) => PlaneError::ModelsNotServed(message),
            (408 | 429 | 500..=599, _) => PlaneError::Unavailable(message),
            _ => PlaneError::Refused(message),
        },
    )
}

/// `LeaseLost` naming the job it was about.
fn about(job: JobId, e: PlaneError) -> PlaneError {
    match e {
        PlaneError::LeaseLost(_) => PlaneError::LeaseLost(job),
        other => other,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl ControlPlane for Remote {
    async fn loaded(&self, worker: &str, load: &ModelLoaded) -> Result<(), PlaneError> {
        let report = CapacityReport {
            worker: worker.into(),
            model: load.model.clone(),
            pixels: load.pixels,
            load_secs: load.seconds,
            evicted: load.evicted.clone(),
        };
        self.call(CAPACITY, &report).await
    }

    async fn lease(
        &self,
        worker: &str,
        models: &Serving,
        batch_key: Option<&str>,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Lease>, PlaneError> {
        let ask = LeaseAsk {
            worker: worker.into(),
            models: models.clone(),
            batch_key: batch_key.map(str::to_string),
            max: max.min(MAX_LEASE),
            visibility_ms: millis(visibility.min(MAX_VISIBILITY)),
            wait_ms: millis(wait.min(MAX_WAIT)),
        };
        let leases: Vec<WireLease> = self.call(LEASE, &ask).await?;
        leases
            .into_iter()
            .map(|l| l.into_lease().map_err(PlaneError::Refused))
            .collect()
    }

    async fn heartbeat(
        &self,
        lease: &LeaseToken,
        progress: Option<Progress>,
        visibility: Duration,
    ) -> Result<HeartbeatOutcome, PlaneError> {
        let report = HeartbeatReport {
            job_id: lease.job_id.to_string(),
            lease_id: lease.lease_id.clone(),
            progress,
            visibility_ms: millis(visibility.min(MAX_VISIBILITY)),
        };
        let answer: HeartbeatAnswer = self
            .call(HEARTBEAT, &report)
            .await
            .map_err(|e| about(lease.job_id, e))?;
        Ok(if answer.cancelled {
            HeartbeatOutcome::Cancelled
        } else {
            HeartbeatOutcome::Continue
        })
    }

    async fn complete(&self, lease: &Lease, images: Vec<Bytes>) -> Result<(), PlaneError> {
        let url = format!("{}{COMPLETE}", self.base);
        let body = frame_images(&images);
        let query = [
            ("job_id", lease.job.id.to_string()),
            ("lease_id", lease.token.lease_id.clone()),
        ];
        self.send::<()>(|token| {
            self.http
                .post(&url)
                .query(&query)
                .bearer_auth(token)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body.clone())
        })
        .await
        .map_err(|e| about(lease.job.id, e))
    }

    async fn fail(&self, lease: &LeaseToken, failure: Failure) -> Result<JobStatus, PlaneError> {
        let report = FailureReport {
            job_id: lease.job_id.to_string(),
            lease_id: lease.lease_id.clone(),
            code: failure.code,
            message: failure.message,
            detail: failure.detail,
            retryable: failure.retryable,
        };
        let answer: FailAnswer = self
            .call(FAIL, &report)
            .await
            .map_err(|e| about(lease.job_id, e))?;
        answer
            .status
            .parse()
            .map_err(|_| PlaneError::Refused(format!("an unknown job status {}", answer.status)))
    }

    async fn release(&self, lease: &LeaseToken) -> Result<(), PlaneError> {
        let reference = LeaseRef {
            job_id: lease.job_id.to_string(),
            lease_id: lease.lease_id.clone(),
        };
        self.call(RELEASE, &reference)
            .await
            .map_err(|e| about(lease.job_id, e))
    }

    async fn source(&self, lease: &LeaseToken, visibility: Duration) -> Result<Bytes, PlaneError> {
        let url = format!("{}{SOURCE}", self.base);
        let ask = SourceAsk {
            job_id: lease.job_id.to_string(),
            lease_id: lease.lease_id.clone(),
            visibility_ms: millis(visibility.min(MAX_VISIBILITY)),
        };
        self.send_raw(|token| self.http.post(&url).bearer_auth(token).json(&ask))
            .await
            .map_err(|e| about(lease.job_id, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framed_images_read_back_and_broken_framing_is_refused() {
        let images = vec![
            Bytes::from_static(b"\x89PNG one"),
            Bytes::new(),
            Bytes::from_static(b"2"),
        ];
        let body = frame_images(&images);
        assert_eq!(unframe_images(body.clone()), Some(images));
        assert_eq!(unframe_images(body.slice(..body.len() - 1)), None);
        assert_eq!(unframe_images(Bytes::from_static(b"\0\0")), None);
        assert_eq!(unframe_images(Bytes::new()), Some(Vec::new()));
    }
}

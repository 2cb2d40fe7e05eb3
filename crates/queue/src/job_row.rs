//! A job row as every backend reads it, and how its columns become a [`Job`]: sealed fields
//! opened, the request read back through validation, statuses mapped as clients see them.

use crate::fields::{Field, FieldCipher};
use crate::{Job, JobError, QueueError};
use sparkle_core::{JobStatus, Progress};

/// The columns a [`Job`] is read from, in this order.
pub(crate) const JOB_COLUMNS: &str =
    "id, owner, group_sealed, status, request, attempts, max_attempts, \
    progress_step, progress_total, images, error_code, error_message, created_at, started_at, \
    finished_at, revision, images_attempt";

/// The values of [`JOB_COLUMNS`], as stored.
pub(crate) struct JobColumns {
    pub id: String,
    pub owner: String,
    pub group_sealed: Option<String>,
    pub status: String,
    pub request: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub progress_step: Option<i64>,
    pub progress_total: Option<i64>,
    pub images: i64,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub revision: i64,
    pub images_attempt: Option<i64>,
}

impl JobColumns {
    pub fn into_job(self, fields: &dyn FieldCipher) -> Result<Job, QueueError> {
        let id = self.id;
        let corrupt = |reason: String| QueueError::Corrupt {
            id: id.clone(),
            reason,
        };
        let request =
            zeroize::Zeroizing::new(open_text(fields, Field::JobRequest, &id, &self.request)?);
        let group = self
            .group_sealed
            .ok_or_else(|| corrupt("written before fields were sealed".into()))?;
        Ok(Job {
            id: id.parse().map_err(|e| corrupt(format!("id: {e}")))?,
            owner: self.owner,
            group: open_text(fields, Field::JobGroup, &id, &group)?,
            status: stored_status(&self.status).map_err(corrupt)?,
            request: crate::record::StoredRequest::decode(&request)
                .map_err(|e| corrupt(format!("request: {e}")))?,
            attempts: count(self.attempts),
            max_attempts: count(self.max_attempts),
            progress: match (self.progress_step, self.progress_total) {
                (Some(step), Some(total)) => Some(Progress {
                    step: count(step),
                    total: count(total),
                }),
                _ => None,
            },
            images: count(self.images),
            error: self.error_code.map(|code| JobError {
                code,
                message: self.error_message.unwrap_or_default(),
            }),
            created_at_ms: self.created_at,
            started_at_ms: self.started_at,
            finished_at_ms: self.finished_at,
            revision: self.revision.max(0) as u64,
            images_attempt: self.images_attempt.map(count),
        })
    }
}

fn count(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// Opens a sealed text column of the row `id`.
pub(crate) fn open_text(
    fields: &dyn FieldCipher,
    field: Field,
    id: &str,
    sealed: &str,
) -> Result<String, QueueError> {
    let corrupt = |reason: String| QueueError::Corrupt {
        id: id.to_string(),
        reason: format!("{}: {reason}", field.name()),
    };
    let plain = fields
        .open(field, id, sealed)
        .map_err(|e| corrupt(e.to_string()))?;
    String::from_utf8(plain.to_vec()).map_err(|_| corrupt("not text".into()))
}

/// A stored status as clients see it: a retry waiting for its time is queued.
pub(crate) fn stored_status(text: &str) -> Result<JobStatus, String> {
    match text {
        "retry_wait" => Ok(JobStatus::Queued),
        other => other.parse(),
    }
}

/// The status of job `id` as stored in `text`, or why it cannot be read.
pub(crate) fn status_of_row(id: &str, text: &str) -> Result<JobStatus, QueueError> {
    stored_status(text).map_err(|reason| QueueError::Corrupt {
        id: id.to_string(),
        reason,
    })
}

/// A job id as stored, parsed.
pub(crate) fn parse_id(id: &str) -> Result<sparkle_core::JobId, QueueError> {
    id.parse().map_err(|e| QueueError::Corrupt {
        id: id.to_string(),
        reason: format!("id: {e}"),
    })
}

pub(crate) fn random_lease_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// What a sweep of orphaned images keeps of a job in `status`.
pub(crate) fn kept_images(
    status: &str,
    attempts: i64,
    images_attempt: Option<i64>,
) -> crate::KeptImages {
    match status {
        "succeeded" => crate::KeptImages::Attempt(images_attempt.map(count)),
        "running" => crate::KeptImages::Attempt(Some(count(attempts))),
        _ => crate::KeptImages::Nothing,
    }
}

/// The stored statuses a job of `status` may have (a job waiting out a retry is queued).
pub(crate) fn stored_statuses(status: JobStatus) -> Vec<&'static str> {
    match status {
        JobStatus::Queued => vec!["queued", "retry_wait"],
        other => vec![other.as_str()],
    }
}

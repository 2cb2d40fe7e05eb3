//! The asynchronous jobs API: submit, look, follow, cancel, fetch images.

use super::links::{self, image_views};
use super::submit::{idempotency_key, submit, GenerationBody};
use super::views::{
    Deleted, DeliveryView, HiresView, JobErrorView, JobEvents, JobList, JobView, Png, RequestView,
};
use crate::auth::{Caller, ImageAccess};
use crate::json::Json;
use crate::{ApiError, GatewayState};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use sparkle_core::{ErrorCode, JobId, JobStatus};
use sparkle_queue::{CancelOutcome, DeleteOutcome, DeliveryState, Job, Scope};
use sparkle_store::ImageKey;
use std::convert::Infallible;

/// Submits a job: answered at once with `202` once it is durably queued (or `200` with the
/// job an earlier request with the same `Idempotency-Key` made).
#[utoipa::path(
    post,
    path = "/v1/jobs",
    tag = "jobs",
    request_body = GenerationBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried submit return the job the first one made (1 to 255 printable ASCII characters)", pattern = "^[ -~]*[!-~][ -~]*$", max_length = 255)),
    responses(
        (status = 202, description = "Queued", body = JobView, headers(("Location" = String, description = "The job's URL"))),
        (status = 200, description = "The job this Idempotency-Key already made", body = JobView),
        (status = 409),
    ),
    security(("bearer" = []), ("session" = [])),
)]
pub async fn create(
    State(state): State<GatewayState>,
    caller: Caller,
    headers: HeaderMap,
    Json(body): Json<GenerationBody>,
) -> Result<Response, ApiError> {
    let dedup = idempotency_key(&headers)?;
    if body.response_format.is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "response_format belongs to /v1/images/generations; jobs deliver images at /v1/jobs/{id}/images/{n}",
        ));
    }
    let user = body.user.clone();
    let webhook_url = body.webhook_url.clone();
    let (request, upload) = body.into_request(&[])?;
    let enqueued = submit(
        &state,
        &caller,
        request,
        user.as_deref(),
        dedup,
        webhook_url.as_deref(),
        upload,
    )
    .await?;
    let view = job_view(&state, &enqueued.job).await?;
    let status = if enqueued.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let location = format!("/v1/jobs/{}", enqueued.job.id);
    Ok((status, [(header::LOCATION, location)], axum::Json(view)).into_response())
}

/// `GET /v1/jobs` query parameters.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Jobs per page: 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// Only jobs submitted before this one (the `last_id` of the page before).
    #[param(value_type = Option<String>, pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
    before: Option<String>,
    /// Only jobs of this status.
    #[param(value_type = Option<JobStatus>)]
    status: Option<String>,
}

/// What cancelling answers: the cancelled job, or a finished job's deletion.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum CancelAnswer {
    Cancelled(Box<JobView>),
    Deleted(Deleted),
}

const MAX_PAGE: u32 = 100;

#[utoipa::path(
    get,
    path = "/v1/jobs",
    tag = "jobs",
    params(ListQuery),
    responses((status = 200, body = JobList), (status = 400)),
    security(("bearer" = []), ("session" = [])),
)]
/// The key's own jobs, newest first, a page at a time, in OpenAI's list shape:
/// `{"object": "list", "data", "first_id", "last_id", "has_more"}`.
pub async fn list(
    State(state): State<GatewayState>,
    caller: Caller,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<JobList>, ApiError> {
    if !(caller.0.allows(Scope::Read) || caller.0.allows(Scope::Generate)) {
        return Err(ApiError::new(
            ErrorCode::InsufficientScope,
            "this key lacks the `read` scope",
        ));
    }
    let bad = |param: &'static str, message: String| ApiError {
        param: Some(param),
        ..ApiError::new(ErrorCode::InvalidQuery, message)
    };
    let axum::extract::Query(query) = query.map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidQuery,
            format!(
                "{} (the parameters are limit, before and status)",
                e.body_text()
            ),
        )
    })?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(bad(
            "limit",
            format!("limit must be 1 to {MAX_PAGE}; got {limit}"),
        ));
    }
    let before = match &query.before {
        None => None,
        Some(id) => Some(
            id.parse::<JobId>()
                .map_err(|_| bad("before", format!("before must be a job id; got {id:?}")))?,
        ),
    };
    let status = match &query.status {
        None => None,
        Some(text) => Some(text.parse::<JobStatus>().map_err(|_| {
            bad(
                "status",
                format!(
                    "status must be queued, running, succeeded, failed, cancelled or \
                     dead_lettered; got {text:?}"
                ),
            )
        })?),
    };
    let mut jobs = state
        .queue
        .list_jobs(&caller.0.id, status, before, limit + 1)
        .await?;
    let has_more = jobs.len() > limit as usize;
    jobs.truncate(limit as usize);
    Ok(axum::Json(JobList {
        object: "list",
        data: jobs
            .iter()
            .map(|job| render(&state, job, None, None))
            .collect(),
        first_id: jobs.first().map(|j| j.id.to_string()),
        last_id: jobs.last().map(|j| j.id.to_string()),
        has_more,
    }))
}

/// A job: its status, progress, queue position, images and deliveries.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses((status = 200, body = JobView), (status = 404)),
    security(("bearer" = []), ("session" = [])),
)]
pub async fn show(
    State(state): State<GatewayState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<JobView>, ApiError> {
    let job = owned_job(&state, &caller, &id).await?;
    Ok(axum::Json(job_view(&state, &job).await?))
}

/// Cancels a live job (answered with the job), or deletes a finished one with its images
/// (answered with `deleted`).
#[utoipa::path(
    delete,
    path = "/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "Cancelled (the job) or deleted", body = CancelAnswer),
        (status = 404),
        (status = 409),
    ),
    security(("bearer" = []), ("session" = [])),
)]
pub async fn cancel(
    State(state): State<GatewayState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<axum::Json<CancelAnswer>, ApiError> {
    caller.require(Scope::Generate)?;
    let job = owned_job(&state, &caller, &id).await?;
    match state.queue.cancel(job.id).await? {
        CancelOutcome::Cancelled => {
            tracing::info!(job = %job.id, "job cancelled");
            let job = state
                .queue
                .get(job.id)
                .await?
                .ok_or_else(ApiError::job_not_found)?;
            Ok(axum::Json(CancelAnswer::Cancelled(Box::new(
                job_view(&state, &job).await?,
            ))))
        }
        CancelOutcome::AlreadyFinal(_) => Ok(axum::Json(CancelAnswer::Deleted(
            delete_finished(&state, job.id).await?,
        ))),
        CancelOutcome::NotFound => Err(ApiError::job_not_found()),
    }
}

/// Deletes a finished job: its record, its sealed fields and deliveries, then its images
/// (should removing them fail, the orphan sweep removes them later).
async fn delete_finished(state: &GatewayState, id: JobId) -> Result<Deleted, ApiError> {
    match state.queue.delete_finished(id).await? {
        DeleteOutcome::Deleted => {
            if let Err(e) = state.store.delete_job(id).await {
                tracing::warn!(job = %id, error = %e, "a deleted job's images are left to the sweep");
            }
            tracing::info!(job = %id, "job deleted");
            Ok(Deleted {
                id: id.to_string(),
                deleted: true,
            })
        }
        // Started again in between (it cannot: final is final) or gone meanwhile.
        DeleteOutcome::Live(status) => Err(ApiError::new(
            ErrorCode::JobNotFinished,
            format!("the job is {status}"),
        )),
        DeleteOutcome::NotFound => Err(ApiError::job_not_found()),
    }
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/events",
    tag = "jobs",
    params(("id" = String, Path, description = "The job's id", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "`progress` events whenever the job's state or queue position changes, then one `done`; each event's data is the job as JSON", content_type = "text/event-stream", body = JobEvents),
        (status = 404),
    ),
    security(("bearer" = []), ("session" = [])),
)]
/// Server-sent events: `progress` whenever the job's state or queue position changes, then
/// one `done` with the final state, after which the stream ends. Changes are pushed by the
/// process's one watcher of the queue; a stream costs no query while nothing changes.
pub async fn events(
    State(state): State<GatewayState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = owned_job(&state, &caller, &id).await?;
    let permit = state.streams.open(&caller.0.id)?;
    let subscription = state
        .events
        .subscribe(job.id)
        .await?
        .ok_or_else(ApiError::job_not_found)?;
    let first = subscription.current();
    let stream = futures::stream::unfold(
        Some((state, subscription, Some(first), String::new(), permit)),
        |cursor| async move {
            let (state, mut subscription, mut pending, last, permit) = cursor?;
            loop {
                let update = match pending.take() {
                    Some(update) => update,
                    None => subscription.next().await?,
                };
                let view = render(&state, &update.job, placement(&update), None);
                let text = serde_json::to_string(&view).unwrap_or_default();
                if text == last {
                    continue;
                }
                let done = update.job.status.is_final();
                let event = Event::default()
                    .event(if done { "done" } else { "progress" })
                    .data(&text);
                let next = (!done).then_some((state, subscription, None, text, permit));
                return Some((Ok(event), next));
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Where a pushed update places its job in the queue.
fn placement(update: &sparkle_delivery::events::JobUpdate) -> Option<(u64, Option<f64>)> {
    update.position.map(|ahead| (ahead, update.eta_secs))
}

#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/images/{n}",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("n" = String, Path, description = "The image's index, from 0 (`.png` may follow)"),
        ("expires" = Option<String>, Query, description = "A signed link's expiry (unix seconds)"),
        ("key" = Option<String>, Query, description = "A signed link's signing key id"),
        ("sig" = Option<String>, Query, description = "A signed link's signature"),
    ),
    responses(
        (status = 200, description = "The PNG, with its generation parameters in a `parameters` text chunk", content_type = "image/png", body = Png),
        (status = 404),
        (status = 409),
    ),
    security(("bearer" = []), ("session" = []), ()),
)]
/// The PNG, to an API key that may see the job or to the holder of a signed link to it
/// (cached no longer than the link lives).
pub async fn image(
    State(state): State<GatewayState>,
    access: ImageAccess,
    Path((id, n)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (job, max_age) = match access {
        ImageAccess::Key(caller) => (owned_job(&state, &caller, &id).await?, 3600),
        ImageAccess::Link(query) => {
            let (job, left) = links::linked_job(&state, &id, &n, &query).await?;
            (job, left.min(3600))
        }
    };
    let png = image_bytes(&state, &job, &n).await?;
    let cache = format!("private, max-age={max_age}");
    Ok((
        [
            (header::CONTENT_TYPE, "image/png".to_string()),
            (header::CACHE_CONTROL, cache),
        ],
        png,
    )
        .into_response())
}

/// Image `n` of a finished job, as PNG bytes.
pub async fn image_bytes(
    state: &GatewayState,
    job: &Job,
    n: &str,
) -> Result<bytes::Bytes, ApiError> {
    let not_found = || {
        ApiError::new(
            ErrorCode::ImageNotFound,
            format!("the job has no image {n:?}"),
        )
    };
    let index: u32 = n
        .trim_end_matches(".png")
        .parse()
        .map_err(|_| not_found())?;
    if job.status != JobStatus::Succeeded {
        return Err(ApiError::new(
            ErrorCode::JobNotFinished,
            format!(
                "the job is {}; images are ready once it succeeds",
                job.status
            ),
        ));
    }
    if index >= job.images {
        return Err(not_found());
    }
    state
        .store
        .get(ImageKey { job: job.id, index }, job.images_attempt)
        .await?
        .ok_or_else(not_found)
}

/// The job, if it exists and the caller may see it (others' jobs are "not found").
pub async fn owned_job(state: &GatewayState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    if !(caller.0.allows(Scope::Read) || caller.0.allows(Scope::Generate)) {
        return Err(ApiError::new(
            ErrorCode::InsufficientScope,
            "this key lacks the `read` scope",
        ));
    }
    let id: JobId = id.parse().map_err(|_| ApiError::job_not_found())?;
    match state.queue.get(id).await? {
        Some(job) if caller.owns(&job.owner) => Ok(job),
        _ => Err(ApiError::job_not_found()),
    }
}

/// The JSON shape of a job, shared by every route that shows one: its queue position and
/// its deliveries read now.
///
/// A queued job that has no position any more was leased (or cancelled) between the read and
/// the count: it is read again, so the answer never says `queued` without a position.
pub async fn job_view(state: &GatewayState, job: &Job) -> Result<JobView, ApiError> {
    let mut placed = None;
    let mut moved_on = None;
    if job.status == JobStatus::Queued {
        match state.queue.position(job.id).await? {
            Some(ahead) => {
                let stats = state.queue.stats().await?;
                placed = Some((ahead, sparkle_delivery::events::eta_from(&stats, ahead)));
            }
            None => moved_on = state.queue.get(job.id).await?,
        }
    }
    let job = moved_on.as_ref().unwrap_or(job);
    let deliveries = state.outbox.deliveries_of(job.id).await?;
    Ok(render(state, job, placed, Some(&deliveries)))
}

/// A job as the API shows it: with `placed`, its queue position and ETA; with `deliveries`,
/// where each of its answers stands.
pub fn render(
    state: &GatewayState,
    job: &Job,
    placed: Option<(u64, Option<f64>)>,
    deliveries: Option<&[DeliveryState]>,
) -> JobView {
    let r = &job.request;
    let (queue_position, eta_seconds) = match placed {
        Some((ahead, eta)) if job.status == JobStatus::Queued => (Some(ahead), eta),
        _ => (None, None),
    };
    JobView {
        id: job.id.to_string(),
        object: "job",
        status: job.status,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        created_at: job.created_at_ms / 1000,
        started_at: job.started_at_ms.map(|t| t / 1000),
        finished_at: job.finished_at_ms.map(|t| t / 1000),
        request: RequestView {
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            model: r.model.clone(),
            size: format!("{}x{}", r.width, r.height),
            steps: r.steps,
            guidance_scale: r.guidance_scale,
            seed: r.seed,
            scheduler: r.scheduler,
            n: r.n,
            source: r
                .init
                .map(|init| if init.masked { "inpaint" } else { "image" }),
            strength: r.init.map(|init| init.strength),
            hires: r.hires.map(|h| HiresView {
                size: format!("{}x{}", h.width, h.height),
                steps: h.steps,
                strength: h.strength,
            }),
            loras: r.loras.clone(),
        },
        progress: job.progress,
        images: image_views(state, job),
        error: job.error.as_ref().map(|e| JobErrorView {
            code: e.code.clone(),
            message: e.message.clone(),
        }),
        queue_position,
        eta_seconds,
        deliveries: deliveries.map(|deliveries| {
            deliveries
                .iter()
                .map(|d| DeliveryView {
                    channel: d.channel.clone(),
                    status: d.status.clone(),
                    attempts: d.attempts,
                    last_error: d.last_error.clone(),
                    next_attempt_at: d.next_attempt_at_ms.map(|t| t / 1000),
                })
                .collect()
        }),
    }
}

//! `POST /discord/interactions`: Discord's HTTP interactions endpoint.
//!
//! The signature is checked on the raw bytes before anything is parsed; every failure is a
//! bare 401, as Discord requires (it probes the endpoint with bad signatures and drops URLs
//! that accept them). A `/sparkle` command is validated like any request and committed to
//! the queue before the answer goes out: a type-4 message with the queue position, well
//! inside Discord's 3 seconds since the commit is one local transaction. Invalid options get
//! an ephemeral message that says what is wrong, and nothing is enqueued. The interaction id
//! is the job's idempotency key, so one interaction is one job however often it arrives.

use super::submit::{enqueue, stored_source, Refused, Submission, Upload};
use crate::ApiError;
use crate::{DiscordEndpoint, GatewayState};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sparkle_core::JobId;
use sparkle_core::{ImageRequest, Source};
use sparkle_delivery::discord::DiscordReply;
use sparkle_discord::{ButtonAction, Interaction, InteractionKind, OptionValue, User};
use sparkle_queue::CancelOutcome;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Jobs from Discord belong to this owner; each Discord user is a fairness group.
pub const DISCORD_OWNER: &str = "discord";
/// Message flag: only the invoking user sees the message.
const EPHEMERAL: u32 = 1 << 6;
/// Images the Variations button asks for.
const VARIATIONS: u32 = 4;

/// Discord's HTTP interactions endpoint: requests signed with the application's Ed25519 key
/// (`X-Signature-Ed25519`, `X-Signature-Timestamp`), answered as Discord expects; `404` when
/// Discord is not configured.
#[utoipa::path(
    post,
    path = "/discord/interactions",
    tag = "discord",
    request_body(content = Object, description = "A Discord interaction"),
    params(
        ("X-Signature-Ed25519" = String, Header, description = "The interaction's signature"),
        ("X-Signature-Timestamp" = String, Header, description = "When Discord signed it"),
    ),
    responses(
        (status = 200, description = "Discord's interaction response", body = Object),
        (status = 401, description = "The signature does not verify"),
        (status = 404, description = "Discord is not configured"),
    ),
)]
pub async fn interactions(
    State(state): State<GatewayState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(discord) = state.discord.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if let Err(why) = discord.verifier.verify(
        header("x-signature-ed25519"),
        header("x-signature-timestamp"),
        &body,
        now,
    ) {
        tracing::info!(reason = %why, "refused a Discord request");
        metrics::counter!("sparkle_discord_refused_total").increment(1);
        return (StatusCode::UNAUTHORIZED, "invalid request signature").into_response();
    }
    let interaction: Interaction = match serde_json::from_slice(&body) {
        Ok(interaction) => interaction,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("not an interaction: {e}")).into_response()
        }
    };
    // Autocomplete fires as a user types and reads nothing but the catalog: it spends no
    // command rate.
    if !matches!(
        interaction.kind,
        InteractionKind::Ping | InteractionKind::Autocomplete
    ) {
        if let Err(wait) = within_rates(&discord, &interaction) {
            metrics::counter!("sparkle_discord_rate_limited_total").increment(1);
            let secs = crate::limits::retry_after_secs(wait);
            return message(
                &format!("You are sending commands faster than Sparkle takes them; try again in {secs} s."),
                true,
            );
        }
    }
    match interaction.kind {
        InteractionKind::Ping => Json(json!({ "type": 1 })).into_response(),
        InteractionKind::ApplicationCommand
            if interaction.data.as_ref().and_then(|d| d.name.as_deref()) == Some("sparkle") =>
        {
            sparkle_command(&state, &discord, &interaction).await
        }
        InteractionKind::MessageComponent => component(&state, &discord, &interaction).await,
        InteractionKind::Autocomplete
            if interaction.data.as_ref().and_then(|d| d.name.as_deref()) == Some("sparkle") =>
        {
            autocomplete(&state, &interaction)
        }
        _ => message("Sparkle does not handle this interaction.", true),
    }
}

/// Suggestions for the option being typed: the LoRAs of the model chosen (or the default)
/// for `lora`, embedding names and LoRA tags completing the prompt's last word for `prompt`.
fn autocomplete(state: &GatewayState, interaction: &Interaction) -> Response {
    let model = match interaction.option("model") {
        Some(OptionValue::String(name)) => state.catalog.find(Some(name)),
        _ => state.catalog.find(None),
    };
    let choices = match (interaction.focused(), model) {
        (Some(("lora", typed)), Some(model)) => sparkle_discord::lora_choices(&model.loras, typed),
        (Some(("prompt", typed)), Some(model)) => {
            sparkle_discord::prompt_choices(typed, &model.loras, &model.embeddings)
        }
        _ => Vec::new(),
    };
    Json(sparkle_discord::autocomplete_answer(choices)).into_response()
}

/// Takes one request from the interaction's user and guild rates.
fn within_rates(
    discord: &DiscordEndpoint,
    interaction: &Interaction,
) -> Result<(), std::time::Duration> {
    let now = std::time::Instant::now();
    if let (Some(limiter), Some(user)) = (&discord.rates.per_user, interaction.invoker()) {
        limiter.take(&user.id, now)?;
    }
    if let (Some(limiter), Some(guild)) = (&discord.rates.per_guild, &interaction.guild_id) {
        limiter.take(guild, now)?;
    }
    Ok(())
}

/// A click on one of Sparkle's buttons. The id is checked before anything else: a forged or
/// foreign id changes nothing. Cancel is for the person who asked; anyone who sees a result
/// may re-roll it, as their own new job.
async fn component(
    state: &GatewayState,
    discord: &DiscordEndpoint,
    interaction: &Interaction,
) -> Response {
    let Some(user) = interaction.invoker() else {
        return message("Discord did not say who clicked.", true);
    };
    let custom_id = interaction
        .data
        .as_ref()
        .and_then(|d| d.custom_id.as_deref())
        .unwrap_or_default();
    let Some((action, job)) = discord.buttons.verify(custom_id) else {
        metrics::counter!("sparkle_discord_refused_total").increment(1);
        return message("That button is not one Sparkle made.", true);
    };
    let job = match job.parse::<JobId>() {
        Ok(id) => state.queue.get(id).await,
        Err(_) => return message("That button is not one Sparkle made.", true),
    };
    let job = match job {
        Ok(Some(job)) => job,
        Ok(None) => return message("That image is no longer known to Sparkle.", true),
        Err(e) => {
            tracing::warn!(error = %e, "could not read a job for a button");
            return message(
                "Sparkle could not look that up just now; try again in a minute.",
                true,
            );
        }
    };
    match action {
        ButtonAction::Cancel => {
            if job.group != user_group(user) {
                return message("Only the person who asked can cancel this image.", true);
            }
            match state.queue.cancel(job.id).await {
                Ok(CancelOutcome::Cancelled) => {
                    tracing::info!(job = %job.id, "cancelled from Discord");
                    message("Cancelled.", true)
                }
                Ok(CancelOutcome::AlreadyFinal(status)) => {
                    message(&format!("Too late to cancel: it has {status}."), true)
                }
                Ok(CancelOutcome::NotFound) => {
                    message("That image is no longer known to Sparkle.", true)
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e, "could not cancel from Discord");
                    message("Sparkle could not cancel just now; try again.", true)
                }
            }
        }
        ButtonAction::Reroll | ButtonAction::Variations => {
            let source = match stored_source(state, &job).await {
                Ok(source) => source,
                Err(e) => {
                    tracing::warn!(job = %job.id, error = %e.message, "could not read a job's source image");
                    return message(
                        "The image this one started from is no longer stored, so it cannot be made again.",
                        true,
                    );
                }
            };
            let n = if action == ButtonAction::Reroll {
                1
            } else {
                VARIATIONS
            };
            submit(
                state,
                discord,
                interaction,
                user,
                job.request.again(n),
                source,
            )
            .await
        }
    }
}

async fn sparkle_command(
    state: &GatewayState,
    discord: &DiscordEndpoint,
    interaction: &Interaction,
) -> Response {
    let Some(user) = interaction.invoker() else {
        return message("Discord did not say who asked.", true);
    };
    let request = match request_from(interaction) {
        Ok(request) => request,
        Err(why) => return message(&why, true),
    };
    // The place's policy before any attachment is fetched (submitting checks it again).
    let policy = discord.policy.for_guild(interaction.guild_id.as_deref());
    if let Some(why) = policy.refusal(interaction.channel_id.as_deref(), &request.prompt) {
        return message(&why, true);
    }
    let source = match attached_source(state, discord, interaction).await {
        Ok(source) => source,
        Err(why) => return message(&format!("Can't use that image: {why}"), true),
    };
    submit(state, discord, interaction, user, request, source).await
}

/// Each Discord user is a fairness group.
fn user_group(user: &User) -> String {
    format!("discord:{}", user.id)
}

/// Checks the policy of the server it came from, then enqueues `request` under the
/// interaction's id (one interaction, one job) together with its answer to the interaction,
/// in one transaction that also counts the user's live jobs everywhere against that server's
/// limit; answers with the queue position.
async fn submit(
    state: &GatewayState,
    discord: &DiscordEndpoint,
    interaction: &Interaction,
    user: &User,
    request: ImageRequest,
    source: Option<Source>,
) -> Response {
    let prompt = request.prompt.clone();
    // The server's own policy, or the global one (other servers, DMs).
    let policy = discord.policy.for_guild(interaction.guild_id.as_deref());
    if let Some(why) = policy.refusal(interaction.channel_id.as_deref(), &prompt) {
        return message(&why, true);
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let reply = DiscordReply {
        application_id: interaction.application_id.clone(),
        token: interaction.token.clone(),
        channel_id: interaction.channel_id.clone(),
        attachment_size_limit: interaction.attachment_size_limit,
        token_expires_at_ms: now_ms + discord.token_lifetime.as_millis() as i64,
    };
    let limit = policy.max_live_per_user;
    let submission = Submission {
        owner: DISCORD_OWNER.to_string(),
        // Each Discord user is a fair share of their own.
        share: user_group(user),
        group: user_group(user),
        request,
        source,
        dedup_key: Some(format!("interaction:{}", interaction.id)),
        owner_live_limit: None,
        group_live_limit: (limit > 0).then_some(limit),
        replies: vec![reply.target()],
    };
    match enqueue(state, submission).await {
        Ok(enqueued) => {
            let position = state.queue.position(enqueued.job.id).await.ok().flatten();
            let place = match position {
                Some(0) => "next in line".to_string(),
                Some(n) => format!("{n} ahead in the queue"),
                None => "started".to_string(),
            };
            message(
                &format!(
                    "Submitted **{}** — {place}. Job `{}`.",
                    clip(&prompt, 200),
                    enqueued.job.id
                ),
                false,
            )
        }
        Err(Refused::Queue(sparkle_queue::QueueError::GroupQuota { live, limit })) => message(
            &format!("You already have {live} images on the way (the limit is {limit}); wait for one to finish."),
            true,
        ),
        Err(refused) => {
            let e = ApiError::from(refused);
            if e.code.http_status() < 500 {
                message(&format!("Can't make that: {}", e.message), true)
            } else {
                tracing::warn!(error = %e.message, "a Discord command could not be queued");
                message(
                    "Sparkle could not take the request just now; try again in a minute.",
                    true,
                )
            }
        }
    }
}

/// How long the attached image and mask may take to fetch: the interaction is answered
/// within Discord's three seconds.
const FILE_DEADLINE: Duration = Duration::from_secs(2);

/// The image (and mask) attached to `/sparkle`, fetched from Discord's CDN and checked as
/// any upload is; `None` when none is attached.
async fn attached_source(
    state: &GatewayState,
    discord: &DiscordEndpoint,
    interaction: &Interaction,
) -> Result<Option<Source>, String> {
    let image = interaction.attachment("image").transpose()?;
    let mask = interaction.attachment("mask").transpose()?;
    let Some(image) = image else {
        return match mask {
            Some(_) => Err("a mask applies to an image; attach one as `image`".into()),
            None => Ok(None),
        };
    };
    let max = state.limits.max_source_bytes;
    let started = tokio::time::Instant::now();
    let image = discord.files.fetch(image, max, FILE_DEADLINE).await?;
    let mask = match mask {
        None => None,
        Some(mask) => {
            let left = FILE_DEADLINE.saturating_sub(started.elapsed());
            Some(discord.files.fetch(mask, max, left).await?)
        }
    };
    let upload = Upload {
        image,
        mask,
        transparent_edits: false,
    };
    upload.decode(state).await.map(Some).map_err(|e| e.message)
}

/// The `/sparkle` options as a request; an error message for the user when an option has
/// the wrong type (Discord enforces types, so this is a defence, not the usual path).
fn request_from(interaction: &Interaction) -> Result<ImageRequest, String> {
    let text = |name: &str| match interaction.option(name) {
        None => Ok(None),
        Some(OptionValue::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("`{name}` must be text")),
    };
    let integer = |name: &str| match interaction.option(name) {
        None => Ok(None),
        Some(OptionValue::Integer(n)) => Ok(Some(*n)),
        Some(_) => Err(format!("`{name}` must be a whole number")),
    };
    let number = |name: &str| match interaction.option(name) {
        None => Ok(None),
        Some(OptionValue::Number(n)) => Ok(Some(*n)),
        Some(OptionValue::Integer(n)) => Ok(Some(*n as f64)),
        Some(_) => Err(format!("`{name}` must be a number")),
    };
    let non_negative = |name: &str, v: Option<i64>| -> Result<Option<u64>, String> {
        v.map(|n| u64::try_from(n).map_err(|_| format!("`{name}` must not be negative")))
            .transpose()
    };
    Ok(ImageRequest {
        prompt: text("prompt")?.ok_or("`prompt` is required")?,
        negative_prompt: text("negative_prompt")?,
        model: text("model")?,
        size: text("size")?,
        steps: non_negative("steps", integer("steps")?)?
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        guidance_scale: number("guidance")?.map(|g| g as f32),
        seed: non_negative("seed", integer("seed")?)?,
        scheduler: text("scheduler")?,
        n: Some(1),
        strength: number("strength")?.map(|s| s as f32),
        outpaint: None,
        hires: number("hires")?.map(|scale| sparkle_core::HiresRequest {
            scale: scale as f32,
            steps: None,
            strength: None,
        }),
        loras: match (text("lora")?, number("lora_weight")?) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err("`lora_weight` weighs a LoRA; choose one in `lora`".into())
            }
            (Some(name), weight) => Some(vec![sparkle_core::LoraWeight {
                name,
                weight: weight.map_or(1.0, |w| w as f32),
            }]),
        },
    })
}

fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut clipped: String = text.chars().take(max - 1).collect();
    clipped.push('…');
    clipped
}

/// The most characters of a Discord message's content.
const MAX_CONTENT_CHARS: usize = 2000;

/// An immediate message response (type 4); ephemeral ones only the invoker sees. Longer
/// content than Discord takes is clipped.
fn message(content: &str, ephemeral: bool) -> Response {
    let content = clip(content, MAX_CONTENT_CHARS);
    let mut data = json!({ "content": content, "allowed_mentions": { "parse": [] } });
    if ephemeral {
        data["flags"] = json!(EPHEMERAL);
    }
    Json(json!({ "type": 4, "data": data })).into_response()
}

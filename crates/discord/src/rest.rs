//! Discord's REST API, the part delivery needs: editing an interaction's original response,
//! with an image attached as multipart (`payload_json` + `files[0]`).
//!
//! Rate limits are honoured here, in the one client the delivery task shares: a 429 returns
//! how long to wait (the larger of the body's `retry_after` and `Retry-After`), and a global
//! or shared-scope limit blocks every request until it passes. The caller reschedules rather
//! than sleeps, so one slow channel never holds up the others. Interaction tokens are part
//! of the URL, so URLs never reach logs or errors.

use serde::Deserialize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RestError {
    #[error("rate limited for {retry_after:?}{}", if *global { " (global)" } else { "" })]
    RateLimited { retry_after: Duration, global: bool },
    #[error("Discord answered {status}")]
    Server { status: u16 },
    #[error("Discord refused the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("could not reach Discord: {0}")]
    Network(String),
}

impl RestError {
    /// Whether trying again later can succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(self, RestError::Rejected { .. })
    }
}

/// A transport error in words, with its causes (a refused certificate says so), without
/// the URL: interaction tokens are part of it.
fn network_error(e: reqwest::Error) -> RestError {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    RestError::Network(text)
}

/// An image to attach.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub filename: String,
    /// Its media type: `image/png` or `image/jpeg`.
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

impl Attachment {
    pub fn png(filename: String, bytes: Vec<u8>) -> Self {
        Attachment {
            filename,
            content_type: "image/png",
            bytes,
        }
    }

    pub fn jpeg(filename: String, bytes: Vec<u8>) -> Self {
        Attachment {
            filename,
            content_type: "image/jpeg",
            bytes,
        }
    }
}

pub struct DiscordRest {
    http: reqwest::Client,
    base: String,
    blocked_until: Mutex<Option<Instant>>,
}

#[derive(Deserialize)]
struct RateLimitBody {
    retry_after: Option<f64>,
    global: Option<bool>,
}

/// A message Sparkle sends: text, images (attached as `files[i]`), and buttons.
#[derive(Debug, Clone, Default)]
pub struct Message<'a> {
    pub content: &'a str,
    pub images: &'a [Attachment],
    /// Discord components (action rows); `Some(json!([]))` removes earlier buttons.
    pub components: Option<serde_json::Value>,
}

/// A message body: JSON, or multipart with `payload_json` and `files[i]` when there are images.
fn with_message(
    request: reqwest::RequestBuilder,
    message: &Message<'_>,
) -> Result<reqwest::RequestBuilder, RestError> {
    let mut payload =
        serde_json::json!({ "content": message.content, "allowed_mentions": { "parse": [] } });
    if let Some(components) = &message.components {
        payload["components"] = components.clone();
    }
    if message.images.is_empty() {
        return Ok(request.json(&payload));
    }
    let attachments: Vec<_> = message
        .images
        .iter()
        .enumerate()
        .map(|(i, image)| serde_json::json!({ "id": i, "filename": image.filename }))
        .collect();
    payload["attachments"] = serde_json::Value::from(attachments);
    let part_error = |e: reqwest::Error| network_error(e);
    let json = reqwest::multipart::Part::text(payload.to_string())
        .mime_str("application/json")
        .map_err(part_error)?;
    let mut form = reqwest::multipart::Form::new().part("payload_json", json);
    for (i, image) in message.images.iter().enumerate() {
        let file = reqwest::multipart::Part::bytes(image.bytes.clone())
            .file_name(image.filename.clone())
            .mime_str(image.content_type)
            .map_err(part_error)?;
        form = form.part(format!("files[{i}]"), file);
    }
    Ok(request.multipart(form))
}

impl DiscordRest {
    /// A client for the API at `api_base`. Certificates are verified against the webpki
    /// roots and TLS 1.2 is the least accepted; an `https://` base is never left for plain
    /// http, not even by a redirect. (A plain `http://` base, for a proxy or a test server on
    /// loopback, is the configuration's to allow or refuse.)
    pub fn new(api_base: &str) -> Result<Self, RestError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!(
                "DiscordBot (https://github.com/sparkle, ",
                env!("CARGO_PKG_VERSION"),
                ")"
            ))
            .tls_built_in_root_certs(true)
            .min_tls_version(reqwest::tls::Version::TLS_1_2)
            .https_only(api_base.starts_with("https://"))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(network_error)?;
        Ok(DiscordRest {
            http,
            base: api_base.trim_end_matches('/').to_string(),
            blocked_until: Mutex::new(None),
        })
    }

    /// Edits the interaction's original response; with `image`, the message carries it.
    pub async fn edit_original(
        &self,
        application_id: &str,
        token: &str,
        message: &Message<'_>,
    ) -> Result<(), RestError> {
        if let Some(wait) = self.blocked_for() {
            return Err(RestError::RateLimited {
                retry_after: wait,
                global: true,
            });
        }
        let url = format!(
            "{}/webhooks/{application_id}/{token}/messages/@original",
            self.base
        );
        let request = with_message(self.http.patch(&url), message)?;
        let response = request.send().await.map_err(network_error)?;
        self.check(response).await
    }

    /// Posts a message in a channel with the bot token: the way to answer once an
    /// interaction's token has expired.
    pub async fn create_message(
        &self,
        bot_token: &str,
        channel_id: &str,
        message: &Message<'_>,
    ) -> Result<(), RestError> {
        if let Some(wait) = self.blocked_for() {
            return Err(RestError::RateLimited {
                retry_after: wait,
                global: true,
            });
        }
        let url = format!("{}/channels/{channel_id}/messages", self.base);
        let request = self
            .http
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, format!("Bot {bot_token}"));
        let response = with_message(request, message)?
            .send()
            .await
            .map_err(network_error)?;
        self.check(response).await
    }

    /// Creates or replaces a slash command (global, or in one guild) with the bot token.
    pub async fn register_command(
        &self,
        bot_token: &str,
        application_id: &str,
        guild_id: Option<&str>,
        command: &serde_json::Value,
    ) -> Result<(), RestError> {
        let url = match guild_id {
            Some(guild) => format!(
                "{}/applications/{application_id}/guilds/{guild}/commands",
                self.base
            ),
            None => format!("{}/applications/{application_id}/commands", self.base),
        };
        let response = self
            .http
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, format!("Bot {bot_token}"))
            .json(command)
            .send()
            .await
            .map_err(network_error)?;
        self.check(response).await
    }

    fn blocked_for(&self) -> Option<Duration> {
        let guard = self.blocked_until.lock().ok()?;
        let until = (*guard)?;
        until.checked_duration_since(Instant::now())
    }

    async fn check(&self, response: reqwest::Response) -> Result<(), RestError> {
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let headers = response.headers().clone();
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let text = response.text().await.unwrap_or_default();
        if status == 429 {
            let body: Option<RateLimitBody> = serde_json::from_str(&text).ok();
            let from_body = body.as_ref().and_then(|b| b.retry_after).unwrap_or(0.0);
            let from_header = header("retry-after")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            let reset_after = header("x-ratelimit-reset-after")
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            let secs = from_body
                .max(from_header)
                .max(reset_after)
                .clamp(0.05, 3600.0);
            let retry_after = Duration::from_secs_f64(secs);
            let global = body.and_then(|b| b.global).unwrap_or(false)
                || header("x-ratelimit-global").is_some_and(|v| v == "true")
                || header("x-ratelimit-scope").is_some_and(|v| v == "global");
            if global {
                if let Ok(mut guard) = self.blocked_until.lock() {
                    *guard = Some(Instant::now() + retry_after);
                }
            }
            tracing::warn!(?retry_after, global, "Discord rate limit");
            return Err(RestError::RateLimited {
                retry_after,
                global,
            });
        }
        if status >= 500 {
            return Err(RestError::Server { status });
        }
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.chars().take(200).collect());
        Err(RestError::Rejected { status, message })
    }
}

//! Signing in from a browser: an API key, sent once, exchanged for a session that lives in an
//! `HttpOnly`, `Secure`, `SameSite=Strict` cookie, so the page never keeps the key. The
//! session acts as its key (its scopes, its jobs, its limits) until it expires, is signed
//! out, or the key is revoked.

use super::views::{Deleted, SessionView};
use crate::auth::{csrf_token, BrowserSession, SESSION_COOKIE};
use crate::json::Json;
use crate::{ApiError, GatewayState};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sparkle_core::ErrorCode;
use sparkle_queue::{ApiKey, Scope};
use utoipa::ToSchema;

/// A sign-in.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignIn {
    /// The API key (`spk_…`). Used for this exchange only; the browser keeps the session.
    pub api_key: String,
}

fn view(key: &ApiKey, secret: &str, expires_at_ms: i64) -> SessionView {
    SessionView {
        object: "session",
        key_name: key.name.clone(),
        scopes: key.scopes.iter().map(|s| s.as_str()).collect(),
        expires_at: expires_at_ms / 1000,
        csrf_token: csrf_token(secret),
    }
}

fn cookie(secret: &str, max_age_secs: i64) -> String {
    format!("{SESSION_COOKIE}={secret}; Max-Age={max_age_secs}; Path=/; Secure; HttpOnly; SameSite=Strict")
}

/// Signs in with an API key: the session's cookie is set, and its CSRF token answered.
#[utoipa::path(
    post,
    path = "/v1/session",
    tag = "session",
    request_body = SignIn,
    responses(
        (status = 201, description = "Signed in; the cookie `__Host-sparkle_session` is set", body = SessionView),
        (status = 400), (status = 401), (status = 403), (status = 415),
    ),
)]
pub async fn sign_in(
    State(state): State<GatewayState>,
    Json(body): Json<SignIn>,
) -> Result<Response, ApiError> {
    let key = state
        .keys
        .authenticate(body.api_key.trim())
        .await?
        .ok_or_else(|| ApiError {
            param: Some("api_key"),
            ..ApiError::new(ErrorCode::InvalidApiKey, "the API key is not valid")
        })?;
    if !(key.allows(Scope::Generate) || key.allows(Scope::Read)) {
        return Err(ApiError::new(
            ErrorCode::InsufficientScope,
            "this key can neither generate nor read jobs, so it cannot sign in",
        ));
    }
    let ttl = state.options.session_ttl;
    let expires_at_ms = super::links::unix_now() * 1000 + ttl.as_millis() as i64;
    let secret = state
        .keys
        .open_session(&key.id, expires_at_ms)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey, "the API key is not valid"))?;
    tracing::info!(key = %key.id, "signed in");
    let secret = secret.expose();
    Ok((
        StatusCode::CREATED,
        [(header::SET_COOKIE, cookie(secret, ttl.as_secs() as i64))],
        axum::Json(view(&key, secret, expires_at_ms)),
    )
        .into_response())
}

/// The signed-in session: whose it is, until when, and its CSRF token.
#[utoipa::path(
    get,
    path = "/v1/session",
    tag = "session",
    responses((status = 200, body = SessionView), (status = 401)),
    security(("session" = [])),
)]
pub async fn show(session: BrowserSession) -> axum::Json<SessionView> {
    axum::Json(view(&session.key, &session.secret, session.expires_at_ms))
}

/// Signs out: the session ends on the server, and the cookie is cleared.
#[utoipa::path(
    delete,
    path = "/v1/session",
    tag = "session",
    responses((status = 200, body = Deleted), (status = 401), (status = 403)),
    security(("session" = [])),
)]
pub async fn sign_out(
    State(state): State<GatewayState>,
    session: BrowserSession,
) -> Result<Response, ApiError> {
    let ended = state.keys.end_session(&session.secret).await?;
    tracing::info!(key = %session.key.id, "signed out");
    Ok((
        [(header::SET_COOKIE, cookie("", 0))],
        axum::Json(Deleted {
            id: "session".into(),
            deleted: ended,
        }),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use crate::routes::fixture::*;
    use axum::http::{header, StatusCode};
    use axum::response::Response;
    use sparkle_queue::{ApiKeys, Scope};

    fn set_cookie(answer: &Response) -> String {
        answer
            .headers()
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .expect("Set-Cookie")
            .to_string()
    }

    /// The token with its last character changed: close, and wrong.
    fn altered(token: &str) -> String {
        let last = if token.ends_with('0') { '1' } else { '0' };
        format!("{}{last}", &token[..token.len() - 1])
    }

    /// Signs in with `key`: the cookie header to send, and the CSRF token.
    async fn sign_in(f: &Fixture, key: &str) -> (String, String) {
        let answer = f
            .send_with(
                "POST",
                "/v1/session",
                &[],
                &format!(r#"{{"api_key": "{key}"}}"#),
            )
            .await;
        assert_eq!(answer.status(), StatusCode::CREATED);
        let cookie = set_cookie(&answer);
        let view = json_of(answer).await;
        let pair = cookie.split(';').next().expect("name=value").to_string();
        (pair, view["csrf_token"].as_str().expect("csrf").to_string())
    }

    #[tokio::test]
    async fn a_key_becomes_a_session_cookie_and_every_change_needs_the_csrf_token() {
        let f = fixture().await;
        let answer = f
            .send_with(
                "POST",
                "/v1/session",
                &[],
                &format!(r#"{{"api_key": "{}"}}"#, f.secret),
            )
            .await;
        assert_eq!(answer.status(), StatusCode::CREATED);
        let cookie = set_cookie(&answer);
        assert!(
            cookie.starts_with("__Host-sparkle_session=sps_"),
            "{cookie}"
        );
        for attribute in [
            "; HttpOnly",
            "; Secure",
            "; SameSite=Strict",
            "; Path=/",
            "; Max-Age=43200",
        ] {
            assert!(cookie.contains(attribute), "{attribute} in {cookie}");
        }
        let body = String::from_utf8(body_of(answer).await).expect("utf-8");
        assert!(!body.contains(&f.secret), "the key is not sent back");
        let view: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(view["key_name"], "app");
        let csrf = view["csrf_token"].as_str().expect("csrf").to_string();
        let cookie = cookie.split(';').next().expect("pair").to_string();

        let me = f
            .send_with("GET", "/v1/session", &[("cookie", &cookie)], "")
            .await;
        assert_eq!(me.status(), StatusCode::OK);
        assert_eq!(json_of(me).await["csrf_token"], csrf.as_str());
        let list = f
            .send_with("GET", "/v1/jobs", &[("cookie", &cookie)], "")
            .await;
        assert_eq!(list.status(), StatusCode::OK, "reads need no token");

        let job = r#"{"prompt": "a corgi", "steps": 1}"#;
        for token in [None, Some("0".repeat(64)), Some(altered(&csrf))] {
            let mut headers = vec![("cookie", cookie.as_str())];
            if let Some(token) = &token {
                headers.push(("x-csrf-token", token.as_str()));
            }
            let refused = f.send_with("POST", "/v1/jobs", &headers, job).await;
            assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{token:?}");
            assert_eq!(
                json_of(refused).await["error"]["code"],
                "invalid_csrf_token"
            );
        }
        let list = json_of(
            f.send_with("GET", "/v1/jobs", &[("cookie", &cookie)], "")
                .await,
        )
        .await;
        assert_eq!(
            list["data"].as_array().map(Vec::len),
            Some(0),
            "nothing was queued"
        );
        let made = f
            .send_with(
                "POST",
                "/v1/jobs",
                &[("cookie", &cookie), ("x-csrf-token", &csrf)],
                job,
            )
            .await;
        assert_eq!(made.status(), StatusCode::ACCEPTED);

        let out = f
            .send_with("DELETE", "/v1/session", &[("cookie", &cookie)], "")
            .await;
        assert_eq!(
            out.status(),
            StatusCode::FORBIDDEN,
            "signing out needs the token too"
        );
        let out = f
            .send_with(
                "DELETE",
                "/v1/session",
                &[("cookie", &cookie), ("x-csrf-token", &csrf)],
                "",
            )
            .await;
        assert_eq!(out.status(), StatusCode::OK);
        assert!(
            set_cookie(&out).contains("Max-Age=0"),
            "the cookie is cleared"
        );
        for path in ["/v1/session", "/v1/jobs"] {
            let after = f.send_with("GET", path, &[("cookie", &cookie)], "").await;
            assert_eq!(
                after.status(),
                StatusCode::UNAUTHORIZED,
                "{path} after signing out"
            );
        }
    }

    #[tokio::test]
    async fn bad_keys_open_no_session_and_a_revoked_key_ends_its_own() {
        let f = fixture().await;
        for body in [
            r#"{"api_key": "spk_0000"}"#.to_string(),
            r#"{"api_key": ""}"#.to_string(),
        ] {
            let answer = f.send_with("POST", "/v1/session", &[], &body).await;
            assert_eq!(answer.status(), StatusCode::UNAUTHORIZED, "{body}");
            let error = json_of(answer).await;
            assert_eq!(error["error"]["code"], "invalid_api_key");
            assert_eq!(error["error"]["param"], "api_key");
        }
        let answer = f
            .send_with(
                "POST",
                "/v1/session",
                &[],
                r#"{"api_key": "spk_1", "extra": 1}"#,
            )
            .await;
        assert_eq!(
            answer.status(),
            StatusCode::BAD_REQUEST,
            "unknown fields are refused"
        );
        let (worker, secret) = f
            .queue
            .create_key("w", &[Scope::Worker])
            .await
            .expect("key");
        let answer = f
            .send_with(
                "POST",
                "/v1/session",
                &[],
                &format!(r#"{{"api_key": "{}"}}"#, secret.expose()),
            )
            .await;
        assert_eq!(
            answer.status(),
            StatusCode::FORBIDDEN,
            "a worker's key cannot sign in"
        );
        let _ = worker;

        let (cookie, _) = sign_in(&f, &f.secret).await;
        let key = f.queue.list_keys().await.expect("keys")[0].clone();
        assert!(f.queue.revoke_key(&key.id).await.expect("revoke"));
        let after = f
            .send_with("GET", "/v1/session", &[("cookie", &cookie)], "")
            .await;
        assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
        let bogus = f
            .send_with(
                "GET",
                "/v1/jobs",
                &[("cookie", "__Host-sparkle_session=sps_0")],
                "",
            )
            .await;
        assert_eq!(bogus.status(), StatusCode::UNAUTHORIZED);
    }
}

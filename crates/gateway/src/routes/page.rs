//! The web page at `/`: one HTML file, one script and one style sheet, compiled into the
//! binary (nothing is fetched from anywhere else), under a policy that lets the page run its
//! own script and style and nothing else: no inline script or style, no other origin.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../../web/index.html");
const SCRIPT: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/app.css");

/// The page's policy: its own script, style, images and API, and nothing more.
pub const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; \
     base-uri 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(PAGE_POLICY),
            ),
            // The assets change only with the binary; a revalidation is cheap.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::fixture::*;
    use axum::http::StatusCode;

    #[tokio::test]
    async fn the_page_and_its_assets_are_served_under_a_policy_without_inline_code() {
        let f = fixture().await;
        for (path, kind) in [
            ("/", "text/html"),
            ("/assets/app.js", "text/javascript"),
            ("/assets/app.css", "text/css"),
        ] {
            let answer = f.send("GET", path, false, "").await;
            assert_eq!(answer.status(), StatusCode::OK, "{path}");
            let header = |name| {
                answer
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            assert!(header(header::CONTENT_TYPE).starts_with(kind), "{path}");
            assert_eq!(
                header(header::CONTENT_SECURITY_POLICY),
                PAGE_POLICY,
                "{path}"
            );
            assert_eq!(header(header::X_FRAME_OPTIONS), "DENY");
        }
        assert!(
            !PAGE_POLICY.contains("unsafe"),
            "no inline script or style, no eval"
        );
        // The page holds no inline script, style or handler, and loads only its own files.
        let lower = INDEX.to_lowercase();
        for (at, _) in lower.match_indices("<script") {
            let tag = &lower[at..at + lower[at..].find('>').expect("tag end")];
            assert!(tag.contains(" src=\"/assets/"), "{tag}");
        }
        assert!(!lower.contains("<style") && !lower.contains(" style="));
        assert!(!regex_like_handler(&lower), "no inline event handlers");
        assert!(
            !lower.contains("http://") && !lower.contains("https://"),
            "no other origin"
        );
        assert!(
            !SCRIPT.contains("innerHTML") && !SCRIPT.contains("eval("),
            "text is set as text"
        );
        // The API's own answers keep the policy that allows nothing.
        let api = f.send("GET", "/healthz", false, "").await;
        assert_eq!(
            api.headers()
                .get(header::CONTENT_SECURITY_POLICY)
                .and_then(|v| v.to_str().ok()),
            Some("default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
        );
    }

    /// Whether an HTML text has an inline event handler attribute (` onclick=`, …).
    fn regex_like_handler(html: &str) -> bool {
        html.match_indices(" on").any(|(at, _)| {
            let rest = &html[at + 3..];
            let name_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        })
    }
}

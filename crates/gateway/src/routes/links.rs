//! Signed image links: made for every image a job shows, checked when one is fetched
//! without an API key.

use super::views::ImageView;
use crate::{ApiError, GatewayState};
use sparkle_core::JobId;
use sparkle_queue::Job;
use sparkle_store::{ImageKey, LinkQuery, LinkRefusal, SignedLink};
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A signed link to image `index` of `job`, made with the gateway's public URL.
pub fn sign(state: &GatewayState, job: JobId, index: u32) -> SignedLink {
    state.links.sign(
        &state.options.public_url,
        ImageKey { job, index },
        unix_now(),
    )
}

/// The images of a job as its views show them: `{"index", "url", "expires_at"}` each, the
/// URL a signed link that fetches the PNG without an API key.
pub fn image_views(state: &GatewayState, job: &Job) -> Vec<ImageView> {
    (0..job.images)
        .map(|index| {
            let link = sign(state, job.id, index);
            ImageView {
                index,
                url: link.url,
                expires_at: link.expires_at,
            }
        })
        .collect()
}

/// The job a signed link opens image `n` of, and the seconds the link has left; refused
/// unless the link is genuine, live, and names this very image.
pub async fn linked_job(
    state: &GatewayState,
    id: &str,
    n: &str,
    query: &LinkQuery,
) -> Result<(Job, i64), ApiError> {
    let job: JobId = id.parse().map_err(|_| LinkRefusal::Altered)?;
    let index: u32 = n.parse().map_err(|_| LinkRefusal::Altered)?;
    let now = unix_now();
    state.links.verify(ImageKey { job, index }, query, now)?;
    let job = state
        .queue
        .get(job)
        .await?
        .ok_or_else(ApiError::job_not_found)?;
    // `verify` accepted the expiry, so it parses.
    let left = query.expires.parse::<i64>().unwrap_or(now) - now;
    Ok((job, left.max(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::fixture::*;
    use axum::http::{header, StatusCode};
    use axum::response::Response;
    use sparkle_store::ImageKey;

    /// The path and query of a link made for `PUBLIC`.
    fn route_of(url: &str) -> String {
        url.strip_prefix(PUBLIC).expect("public URL").to_string()
    }

    #[tokio::test]
    async fn a_jobs_image_links_fetch_it_without_a_key_and_nothing_else() {
        let f = fixture().await;
        let id = f.finished_job().await;
        let view = json_of(f.send("GET", &format!("/v1/jobs/{id}"), true, "").await).await;
        let images = view["images"].as_array().expect("images");
        assert_eq!(images.len(), 1, "{view}");
        assert_eq!(images[0]["index"], 0);
        let url = images[0]["url"].as_str().expect("url");
        let expires_at = images[0]["expires_at"].as_i64().expect("expires_at");
        assert!((expires_at - unix_now() - 3600).abs() <= 2, "{view}");
        let link = route_of(url);
        assert!(link.starts_with(&format!("/v1/jobs/{id}/images/0?expires=")));

        let answer = f.send("GET", &link, false, "").await;
        assert_eq!(answer.status(), StatusCode::OK);
        let cache = answer.headers()[header::CACHE_CONTROL]
            .to_str()
            .expect("ascii")
            .to_string();
        let max_age: i64 = cache
            .strip_prefix("private, max-age=")
            .and_then(|s| s.parse().ok())
            .expect(&cache);
        assert!((3590..=3600).contains(&max_age), "{cache}");
        assert_eq!(body_of(answer).await, PNG);

        let refused = |answer: Response| async move {
            assert_eq!(answer.status(), StatusCode::FORBIDDEN);
            let no_store = answer.headers()[header::CACHE_CONTROL].clone();
            assert_eq!(no_store, "no-store");
            let error = json_of(answer).await;
            assert_eq!(error["error"]["code"], "invalid_image_link", "{error}");
            error["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let (head, sig) = link.split_once("&sig=").expect("sig");
        let flipped = if sig.starts_with('A') { "B" } else { "A" };
        let forged = format!("{head}&sig={flipped}{}", &sig[1..]);
        let message = refused(f.send("GET", &forged, false, "").await).await;
        assert!(message.contains("not valid"), "{message}");
        let other_image = link.replacen("/images/0?", "/images/1?", 1);
        refused(f.send("GET", &other_image, false, "").await).await;
        let unsigned = link.split_once("&key=").expect("key").0.to_string();
        refused(f.send("GET", &unsigned, false, "").await).await;

        let stale = f
            .state
            .links
            .sign(PUBLIC, ImageKey { job: id, index: 0 }, unix_now() - 7200);
        let message = refused(f.send("GET", &route_of(&stale.url), false, "").await).await;
        assert!(message.contains("expired"), "{message}");

        // The key still works as it always did, and without either there is no image.
        let answer = f
            .send("GET", &format!("/v1/jobs/{id}/images/0"), true, "")
            .await;
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(
            answer.headers()[header::CACHE_CONTROL],
            "private, max-age=3600"
        );
        let answer = f
            .send("GET", &format!("/v1/jobs/{id}/images/0"), false, "")
            .await;
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    }
}

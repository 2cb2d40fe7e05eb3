//! Admission before any work: request rates per client address (before authentication),
//! the time a client has to send its request, and the time a route has to answer.
//!
//! Rates are token buckets: each client address (an IPv4 address, or an IPv6 /64, which one
//! holder usually has whole) may send `burst` requests at once and `per_sec` a second after
//! that. A refused request gets `429 rate_limited` with `Retry-After`, the seconds until its
//! bucket holds a token again. Buckets live in memory, per gateway process; the number of
//! addresses tracked is bounded, full buckets being forgotten first.

use crate::listener::ConnectionAdmission;
use crate::{ApiError, GatewayState};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use sparkle_core::ErrorCode;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses (or keys) tracked at most by one limiter.
const MAX_TRACKED: usize = 100_000;

/// The client a connection counts against: its IPv4 address, or its IPv6 /64.
pub fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Token buckets by key.
pub struct RateLimiter<K> {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `per_sec` requests a second after a first `burst` (at least 1); `None` when `per_sec`
    /// is 0, the limit being off.
    pub fn new(per_sec: u32, burst: u32) -> Option<Self> {
        (per_sec > 0).then(|| RateLimiter {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a token from `key`'s bucket, or says how long until one is there.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(key) {
            self.forget(&mut buckets, now);
        }
        let burst = self.burst;
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_sec,
            ))
        }
    }

    /// Whether `key`'s bucket holds a token, without taking it.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let Some(bucket) = buckets.get(key) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        let tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / self.per_sec))
        }
    }

    /// Makes room: buckets full again are the same as new ones; if that is not enough, the
    /// older half goes.
    fn forget(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        let (per_sec, burst) = (self.per_sec, self.burst);
        buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < burst
        });
        if buckets.len() >= MAX_TRACKED / 2 {
            let mut times: Vec<Instant> = buckets.values().map(|b| b.at).collect();
            times.sort_unstable();
            let cut = times[times.len() / 2];
            buckets.retain(|_, b| b.at > cut);
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or(0)
    }
}

/// Whole seconds to wait, at least one.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// The route a liveness probe may call as often as it likes (it does no work).
fn is_probe(path: &str) -> bool {
    path == "/healthz"
}

/// Discord's endpoint: its requests carry every user's commands from a few addresses.
const DISCORD_ROUTE: &str = "/discord/interactions";

/// Refuses, before anything else is done: a request on a connection past the connection
/// caps (`503 too_many_connections`, except signed Discord interactions past the per-address
/// cap), and a client address over its rate (`429`). Discord interactions spend their
/// address's rate only when they are not verified ones: those are limited per Discord user
/// and per guild instead.
pub async fn per_ip(State(state): State<GatewayState>, request: Request, next: Next) -> Response {
    let discord = request.uri().path() == DISCORD_ROUTE;
    match request.extensions().get::<ConnectionAdmission>() {
        Some(ConnectionAdmission::OverTotalCap) => return too_many_connections("the gateway"),
        Some(ConnectionAdmission::OverAddressCap) if !discord => {
            return too_many_connections("your address")
        }
        _ => {}
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| client_of(c.0.ip()));
    let (Some(limiter), Some(peer)) = (&state.admission.per_ip, peer) else {
        return next.run(request).await;
    };
    if is_probe(request.uri().path()) {
        return next.run(request).await;
    }
    let now = Instant::now();
    let verdict = if discord {
        limiter.check(&peer, now)
    } else {
        limiter.take(&peer, now)
    };
    if let Err(wait) = verdict {
        let secs = retry_after_secs(wait);
        return ApiError::new(
            ErrorCode::RateLimited,
            format!("too many requests from your address; retry in {secs} s"),
        )
        .retry_after(secs)
        .into_response();
    }
    let response = next.run(request).await;
    // Only a verified interaction is answered 200: anything else (a bad signature, an
    // endpoint that is off) spends the address's rate.
    if discord && !response.status().is_success() {
        let _ = limiter.take(&peer, Instant::now());
    }
    response
}

/// `503 too_many_connections` with `Retry-After`, closing the connection after it.
fn too_many_connections(whose: &str) -> Response {
    let mut response = ApiError::new(
        ErrorCode::TooManyConnections,
        format!("{whose} holds as many connections as the gateway allows; retry in 1 s"),
    )
    .retry_after(1)
    .into_response();
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

/// How much of a too-large body is still read (and dropped) before the refusal is sent.
const DRAIN_BYTES: usize = 1 << 20;

/// The routes whose bodies carry images.
const IMAGE_ROUTES: &[&str] = &["/v1/jobs", "/v1/images/generations", "/v1/images/edits"];

/// Whether this request may carry images: a POST with credentials to a route that takes
/// them (the credentials are checked before more than `max_body_bytes` is read).
fn may_carry_images(parts: &axum::http::request::Parts) -> bool {
    parts.method == axum::http::Method::POST
        && IMAGE_ROUTES.contains(&parts.uri.path())
        && (parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION)
            || crate::auth::session_cookie(&parts.headers).is_some())
}

/// Reads the whole body within the request timeout, so that a client trickling its body
/// cannot hold the handler or the connection: at most `max_body_bytes`, or
/// `max_image_body_bytes` on the routes that take images for a request whose credentials
/// check out — checked once the body passes `max_body_bytes`, so an anonymous client can
/// never make the gateway hold more than that.
pub async fn read_body(
    State(state): State<GatewayState>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let small = state.options.max_body_bytes;
    let large = if may_carry_images(&parts) {
        state.options.max_image_body_bytes.max(small)
    } else {
        small
    };
    // Read past the limit, discarding, before answering a body that is too large (up to
    // DRAIN_BYTES more, within the request timeout): a client still writing its body when
    // the connection closes sees a reset, not the answer.
    let collect = async {
        let mut limit = small;
        let mut checked = false;
        let mut bytes = Vec::new();
        let mut seen = 0usize;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|_| None)?;
            seen += chunk.len();
            if seen > limit && large > small && !checked {
                checked = true;
                if crate::auth::credentials_hold(&parts, &state).await {
                    limit = large;
                }
            }
            if seen > limit.saturating_add(DRAIN_BYTES) {
                break;
            }
            if seen <= limit {
                bytes.extend_from_slice(&chunk);
            }
        }
        if seen > limit {
            return Err(Some(limit));
        }
        Ok(bytes)
    };
    match tokio::time::timeout(state.options.request_timeout, collect).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(Some(limit))) => ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("the request body is larger than the limit of {limit} bytes"),
        )
        .into_response(),
        Ok(Err(None)) => {
            ApiError::new(ErrorCode::InvalidJson, "the request body could not be read")
                .into_response()
        }
        Err(_) => request_timeout(state.options.request_timeout, "send the request body"),
    }
}

/// Bounds the time a route that does not wait for images takes to answer.
pub async fn deadline(State(state): State<GatewayState>, request: Request, next: Next) -> Response {
    let limit = state.options.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => request_timeout(limit, "answer"),
    }
}

fn request_timeout(limit: Duration, what: &str) -> Response {
    let mut response = ApiError::new(
        ErrorCode::RequestTimeout,
        format!(
            "the request took longer than {} s to {what}",
            limit.as_secs()
        ),
    )
    .into_response();
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_each_client_on_its_own() {
        let limiter = RateLimiter::new(2, 3).expect("on");
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.take(&"a", t0).expect("within the burst");
        }
        let wait = limiter.take(&"a", t0).expect_err("over");
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        limiter.take(&"b", t0).expect("another client");
        limiter
            .take(&"a", t0 + Duration::from_millis(500))
            .expect("refilled");
        assert!(limiter.take(&"a", t0 + Duration::from_millis(600)).is_err());
        // A long pause refills to the burst, never beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            limiter.take(&"a", later).expect("burst again");
        }
        assert!(limiter.take(&"a", later).is_err());
        assert!(RateLimiter::<&str>::new(0, 10).is_none(), "0: off");
    }

    #[test]
    fn the_tracked_clients_stay_bounded() {
        let limiter = RateLimiter::new(1, 1).expect("on");
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED + 10) as u64 {
            let _ = limiter.take(&i, t0 + Duration::from_micros(i));
        }
        assert!(limiter.tracked() <= MAX_TRACKED, "{}", limiter.tracked());
        // The newest clients are still remembered (and refused).
        let newest = (MAX_TRACKED + 9) as u64;
        assert!(limiter
            .take(&newest, t0 + Duration::from_micros(newest))
            .is_err());
    }

    #[test]
    fn ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(client_of(a), client_of(b));
        assert_ne!(client_of(a), client_of(c));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(client_of(mapped), "10.1.2.3".parse::<IpAddr>().expect("ip"));
    }
}

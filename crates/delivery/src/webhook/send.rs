//! One webhook POST and what its answer means. Redirects are not followed (the new location
//! was never checked), names resolve through [`GuardedResolver`], and no proxy is used (it
//! would resolve the name itself). The reason given for an outcome is short and meant for
//! the webhook's owner: it never holds the response body or the signature.

use super::address::{GuardedResolver, UrlPolicy, UrlRefusal};
use super::schedule::MAX_RETRY_AFTER;
use super::WebhookError;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::{redirect, Client, StatusCode, Url};
use std::error::Error as StdError;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const USER_AGENT: &str = concat!("Sparkle-Webhooks/", env!("CARGO_PKG_VERSION"));
/// The most of a response body that is read (and thrown away).
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// What came of one POST.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    /// The receiver answered 2xx.
    Delivered { status: u16 },
    /// Worth another attempt: 429, 5xx, 3xx, any 4xx but 410, a timeout, a failed connection.
    /// `retry_after` is the receiver's `Retry-After`, at most a day.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Not worth another attempt: the receiver answered 410 Gone, or the URL is refused.
    Refused { reason: String },
}

/// Sends signed webhooks.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    http: Client,
    policy: UrlPolicy,
    connect_timeout: Duration,
    timeout: Duration,
}

impl WebhookClient {
    /// A client that follows no redirects, resolves through [`GuardedResolver`], uses no proxy,
    /// gives up connecting after `connect_timeout` and on the whole request after `timeout`.
    pub fn new(
        policy: UrlPolicy,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<WebhookClient, WebhookError> {
        let http = Client::builder()
            .user_agent(USER_AGENT)
            .redirect(redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver::new(policy)))
            .https_only(policy.require_https)
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .build()
            .map_err(WebhookError::Client)?;
        Ok(WebhookClient {
            http,
            policy,
            connect_timeout,
            timeout,
        })
    }

    /// POSTs `body` as `application/json` with `webhook-id`, `webhook-timestamp` and
    /// `webhook-signature`.
    pub async fn send(
        &self,
        url: &Url,
        msg_id: &str,
        timestamp: i64,
        signature: &str,
        body: Bytes,
    ) -> SendOutcome {
        // Hosts written as IP addresses are connected to without a resolver.
        if let Err(refusal) = self.policy.check_url(url) {
            return SendOutcome::Refused {
                reason: refusal.to_string(),
            };
        }
        let headers = match webhook_headers(msg_id, timestamp, signature) {
            Ok(headers) => headers,
            Err(reason) => return SendOutcome::Refused { reason },
        };
        let sent = self
            .http
            .post(url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => return self.failure(url, &error),
        };
        let status = response.status();
        let retry_after = retry_after(response.headers(), SystemTime::now());
        let redirect = response.headers().contains_key(LOCATION);
        discard(response).await;
        answer(status, retry_after, redirect)
    }

    fn failure(&self, url: &Url, error: &reqwest::Error) -> SendOutcome {
        if let Some(refusal) = find::<UrlRefusal>(error) {
            return match refusal {
                UrlRefusal::Unresolvable => SendOutcome::Retry {
                    reason: refusal.to_string(),
                    retry_after: None,
                },
                _ => SendOutcome::Refused {
                    reason: refusal.to_string(),
                },
            };
        }
        let reason = if error.is_timeout() {
            if error.is_connect() {
                format!(
                    "timed out after {} connecting",
                    seconds(self.connect_timeout)
                )
            } else {
                format!("timed out after {}", seconds(self.timeout))
            }
        } else {
            match io_kind(error) {
                Some(io::ErrorKind::ConnectionRefused) => "connection refused".to_owned(),
                Some(io::ErrorKind::ConnectionReset) => "connection reset".to_owned(),
                Some(io::ErrorKind::HostUnreachable) => "host unreachable".to_owned(),
                Some(io::ErrorKind::NetworkUnreachable) => "network unreachable".to_owned(),
                Some(io::ErrorKind::InvalidData) if url.scheme() == "https" => {
                    "TLS handshake failed".to_owned()
                }
                _ if error.is_connect() => "connection failed".to_owned(),
                _ => "connection closed before a response".to_owned(),
            }
        };
        SendOutcome::Retry {
            reason,
            retry_after: None,
        }
    }
}

fn webhook_headers(msg_id: &str, timestamp: i64, signature: &str) -> Result<HeaderMap, String> {
    let value = |name: &str, text: &str| {
        HeaderValue::from_str(text).map_err(|_| format!("{name} is not a valid header value"))
    };
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("webhook-id", value("webhook-id", msg_id)?);
    headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
    headers.insert("webhook-signature", value("webhook-signature", signature)?);
    Ok(headers)
}

/// What an HTTP answer means for the delivery.
fn answer(status: StatusCode, retry_after: Option<Duration>, redirect: bool) -> SendOutcome {
    let code = status.as_u16();
    if status.is_success() {
        SendOutcome::Delivered { status: code }
    } else if status == StatusCode::GONE {
        SendOutcome::Refused {
            reason: "HTTP 410: the receiver asked for no more deliveries".to_owned(),
        }
    } else if status.is_redirection() && redirect {
        SendOutcome::Retry {
            reason: format!("redirect to another location is not followed (HTTP {code})"),
            retry_after,
        }
    } else {
        SendOutcome::Retry {
            reason: format!("HTTP {code}"),
            retry_after,
        }
    }
}

/// `Retry-After` as seconds or as an HTTP date, at most a day.
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value
            .parse::<u64>()
            .map_or(MAX_RETRY_AFTER, Duration::from_secs)
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Reads a little of the body, so that a short answer leaves the connection reusable, and
/// throws it away.
async fn discard(mut response: reqwest::Response) {
    let mut read = 0;
    while read < MAX_RESPONSE_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => break,
        }
    }
}

/// The first error of type `T` in a chain of sources.
fn find<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    chain(error).find_map(|error| error.downcast_ref::<T>())
}

/// The most telling kind among the I/O errors in a chain of sources.
fn io_kind(error: &(dyn StdError + 'static)) -> Option<io::ErrorKind> {
    chain(error)
        .filter_map(|error| error.downcast_ref::<io::Error>())
        .map(io::Error::kind)
        .find(|kind| *kind != io::ErrorKind::Other)
}

/// An error and its sources. An I/O error wrapping another error is followed into it: its
/// `source()` skips the wrapped error itself.
fn chain<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&error| {
        match error.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
            None => error.source(),
        }
    })
}

fn seconds(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::WebhookSecret;
    use axum::extract::State;
    use axum::http::{HeaderName, Uri};
    use axum::response::{IntoResponse, Response};
    use axum::Router;
    use std::net::SocketAddr;
    use std::sync::Mutex;
    use std::time::UNIX_EPOCH;
    use tokio::net::TcpListener;

    const LOCAL: UrlPolicy = UrlPolicy {
        require_https: false,
        allow_private_addresses: true,
    };
    const PUBLIC_ONLY: UrlPolicy = UrlPolicy {
        require_https: false,
        allow_private_addresses: false,
    };
    const BODY: &[u8] = br#"{"type":"job.succeeded","data":{"id":"job_1"}}"#;
    const LEAK: &str = "internal stack trace";

    /// One request as the receiver saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        path: String,
        headers: HeaderMap,
        body: Bytes,
    }

    type Log = Arc<Mutex<Vec<Seen>>>;

    /// A receiver on 127.0.0.1 whose answer depends on the path.
    async fn receiver() -> (SocketAddr, Log) {
        let log = Log::default();
        let app = Router::new().fallback(receive).with_state(log.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let address = listener.local_addr().expect("a bound port");
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        (address, log)
    }

    async fn receive(
        State(log): State<Log>,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        log.lock().expect("log").push(Seen {
            path: uri.path().to_owned(),
            headers,
            body,
        });
        match uri.path() {
            "/ok" => (StatusCode::OK, "thanks").into_response(),
            "/accepted" => StatusCode::NO_CONTENT.into_response(),
            "/error" => (StatusCode::INTERNAL_SERVER_ERROR, LEAK).into_response(),
            "/busy" => (StatusCode::TOO_MANY_REQUESTS, [(RETRY_AFTER, "7")], LEAK).into_response(),
            "/gone" => (StatusCode::GONE, LEAK).into_response(),
            "/missing" => StatusCode::NOT_FOUND.into_response(),
            "/redirect" => (StatusCode::FOUND, [(LOCATION, "/target")]).into_response(),
            "/huge" => (StatusCode::OK, vec![b'x'; 4 * 1024 * 1024]).into_response(),
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                StatusCode::OK.into_response()
            }
            _ => StatusCode::OK.into_response(),
        }
    }

    fn client(policy: UrlPolicy) -> WebhookClient {
        WebhookClient::new(policy, Duration::from_secs(2), Duration::from_secs(5))
            .expect("a client")
    }

    fn url(address: SocketAddr, path: &str) -> Url {
        Url::parse(&format!("http://{address}{path}")).expect("a URL")
    }

    async fn post(client: &WebhookClient, url: &Url) -> SendOutcome {
        client
            .send(
                url,
                "msg_1",
                1_700_000_000,
                "v1,c2lnbmF0dXJl",
                Bytes::from_static(BODY),
            )
            .await
    }

    fn paths(log: &Log) -> Vec<String> {
        log.lock()
            .expect("log")
            .iter()
            .map(|seen| seen.path.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_2xx_is_delivered() {
        let (address, _) = receiver().await;
        let client = client(LOCAL);
        assert_eq!(
            post(&client, &url(address, "/ok")).await,
            SendOutcome::Delivered { status: 200 }
        );
        assert_eq!(
            post(&client, &url(address, "/accepted")).await,
            SendOutcome::Delivered { status: 204 }
        );
        assert_eq!(
            post(&client, &url(address, "/huge")).await,
            SendOutcome::Delivered { status: 200 }
        );
    }

    #[tokio::test]
    async fn the_signed_headers_and_body_arrive_as_given() {
        let (address, log) = receiver().await;
        let secret = WebhookSecret::generate();
        let signature = secret.sign("msg_2fX", 1_714_000_000, BODY);
        let outcome = client(LOCAL)
            .send(
                &url(address, "/ok"),
                "msg_2fX",
                1_714_000_000,
                &signature,
                Bytes::from_static(BODY),
            )
            .await;
        assert_eq!(outcome, SendOutcome::Delivered { status: 200 });

        let seen = log.lock().expect("log")[0].clone();
        let header = |name: &str| {
            seen.headers
                .get(HeaderName::from_bytes(name.as_bytes()).expect("a header name"))
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(seen.path, "/ok");
        assert_eq!(header("webhook-id").as_deref(), Some("msg_2fX"));
        assert_eq!(header("webhook-timestamp").as_deref(), Some("1714000000"));
        assert_eq!(
            header("webhook-signature").as_deref(),
            Some(signature.as_str())
        );
        assert_eq!(header("content-type").as_deref(), Some("application/json"));
        let agent = header("user-agent").expect("a user agent");
        assert!(agent.starts_with("Sparkle-Webhooks/"), "{agent}");
        assert_eq!(&seen.body[..], BODY);
        assert!(secret.verify("msg_2fX", 1_714_000_000, &seen.body, &signature));
    }

    #[tokio::test]
    async fn failures_are_retried_without_the_body() {
        let (address, _) = receiver().await;
        let client = client(LOCAL);
        assert_eq!(
            post(&client, &url(address, "/error")).await,
            SendOutcome::Retry {
                reason: "HTTP 500".to_owned(),
                retry_after: None
            }
        );
        assert_eq!(
            post(&client, &url(address, "/busy")).await,
            SendOutcome::Retry {
                reason: "HTTP 429".to_owned(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            post(&client, &url(address, "/missing")).await,
            SendOutcome::Retry {
                reason: "HTTP 404".to_owned(),
                retry_after: None
            }
        );
    }

    #[tokio::test]
    async fn gone_stops_the_deliveries() {
        let (address, _) = receiver().await;
        match post(&client(LOCAL), &url(address, "/gone")).await {
            SendOutcome::Refused { reason } => {
                assert!(reason.starts_with("HTTP 410"), "{reason}");
                assert!(!reason.contains(LEAK));
            }
            other => panic!("410 must be refused, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let (address, log) = receiver().await;
        assert_eq!(
            post(&client(LOCAL), &url(address, "/redirect")).await,
            SendOutcome::Retry {
                reason: "redirect to another location is not followed (HTTP 302)".to_owned(),
                retry_after: None
            }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(paths(&log), ["/redirect"]);
    }

    #[tokio::test]
    async fn a_slow_receiver_times_out() {
        let (address, _) = receiver().await;
        let client = WebhookClient::new(LOCAL, Duration::from_secs(1), Duration::from_millis(300))
            .expect("a client");
        assert_eq!(
            post(&client, &url(address, "/slow")).await,
            SendOutcome::Retry {
                reason: "timed out after 300 ms".to_owned(),
                retry_after: None
            }
        );
    }

    #[tokio::test]
    async fn a_closed_port_is_retried() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let address = listener.local_addr().expect("a bound port");
        drop(listener);
        assert_eq!(
            post(&client(LOCAL), &url(address, "/ok")).await,
            SendOutcome::Retry {
                reason: "connection refused".to_owned(),
                retry_after: None
            }
        );
    }

    #[tokio::test]
    async fn tls_to_a_plain_http_receiver_fails_the_handshake() {
        let (address, _) = receiver().await;
        let url = Url::parse(&format!("https://{address}/ok")).expect("a URL");
        assert_eq!(
            post(&client(LOCAL), &url).await,
            SendOutcome::Retry {
                reason: "TLS handshake failed".to_owned(),
                retry_after: None
            }
        );
    }

    #[tokio::test]
    async fn a_private_address_is_refused_without_connecting() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let address = listener.local_addr().expect("a bound port");
        assert_eq!(
            post(&client(PUBLIC_ONLY), &url(address, "/ok")).await,
            SendOutcome::Refused {
                reason: "webhook_url resolves to a private address (127.0.0.1)".to_owned()
            }
        );
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "a connection was made");
    }

    #[tokio::test]
    async fn a_name_for_a_private_address_is_refused_at_send_time() {
        let (address, log) = receiver().await;
        let url = Url::parse(&format!("http://localhost:{}/ok", address.port())).expect("a URL");
        match post(&client(PUBLIC_ONLY), &url).await {
            SendOutcome::Refused { reason } => assert!(
                reason.starts_with("webhook_url resolves to a private address ("),
                "{reason}"
            ),
            other => panic!("localhost must be refused, got {other:?}"),
        }
        assert!(paths(&log).is_empty());
    }

    #[tokio::test]
    async fn http_is_refused_when_https_is_required() {
        let (address, log) = receiver().await;
        let policy = UrlPolicy {
            require_https: true,
            allow_private_addresses: true,
        };
        assert_eq!(
            post(&client(policy), &url(address, "/ok")).await,
            SendOutcome::Refused {
                reason: "webhook_url must use https".to_owned()
            }
        );
        assert!(paths(&log).is_empty());
    }

    #[tokio::test]
    async fn a_bad_message_id_is_refused() {
        let (address, log) = receiver().await;
        let outcome = client(LOCAL)
            .send(&url(address, "/ok"), "msg\n1", 1, "v1,x", Bytes::new())
            .await;
        assert_eq!(
            outcome,
            SendOutcome::Refused {
                reason: "webhook-id is not a valid header value".to_owned()
            }
        );
        assert!(paths(&log).is_empty());
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_up_to_a_day() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let read = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_str(value).expect("a value"));
            retry_after(&headers, now)
        };
        assert_eq!(read("7"), Some(Duration::from_secs(7)));
        assert_eq!(read(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(read("0"), Some(Duration::ZERO));
        assert_eq!(read("999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(read("99999999999999999999999"), Some(MAX_RETRY_AFTER));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(read(&later), Some(Duration::from_secs(90)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(read(&earlier), Some(Duration::ZERO));
        let next_week = httpdate::fmt_http_date(now + Duration::from_secs(7 * 86_400));
        assert_eq!(read(&next_week), Some(MAX_RETRY_AFTER));
        assert_eq!(read("soon"), None);
        assert_eq!(read("-5"), None);
        assert_eq!(read(""), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn answers_map_to_outcomes() {
        let retry = |reason: &str| SendOutcome::Retry {
            reason: reason.to_owned(),
            retry_after: None,
        };
        assert_eq!(
            answer(StatusCode::ACCEPTED, None, false),
            SendOutcome::Delivered { status: 202 }
        );
        assert_eq!(
            answer(StatusCode::BAD_GATEWAY, None, false),
            retry("HTTP 502")
        );
        assert_eq!(
            answer(StatusCode::UNAUTHORIZED, None, false),
            retry("HTTP 401")
        );
        assert_eq!(
            answer(StatusCode::NOT_MODIFIED, None, false),
            retry("HTTP 304")
        );
        assert_eq!(
            answer(StatusCode::PERMANENT_REDIRECT, None, true),
            retry("redirect to another location is not followed (HTTP 308)")
        );
        assert!(matches!(
            answer(StatusCode::GONE, None, false),
            SendOutcome::Refused { .. }
        ));
    }

    #[test]
    fn durations_read_as_seconds_or_milliseconds() {
        assert_eq!(seconds(Duration::from_secs(10)), "10 s");
        assert_eq!(seconds(Duration::from_millis(1500)), "1500 ms");
    }
}

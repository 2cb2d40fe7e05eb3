//! Where a webhook may go. A webhook URL is someone else's choice of where this service sends
//! a request, so it must not reach the service's own network: loopback, private ranges, cloud
//! metadata, and every IPv6 spelling of them. The URL is checked when it is given
//! ([`UrlPolicy::check`]) and again at every send ([`GuardedResolver`]), because the name may
//! resolve elsewhere by then.

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use url::Host;

/// The longest webhook URL accepted, in bytes.
pub const MAX_URL_LEN: usize = 2048;
/// How long a name may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Which webhook URLs are accepted.
#[derive(Debug, Clone, Copy)]
pub struct UrlPolicy {
    /// Refuse `http://`.
    pub require_https: bool,
    /// Let webhooks reach loopback and private networks (development and tests only).
    pub allow_private_addresses: bool,
}

impl Default for UrlPolicy {
    /// https only, public addresses only.
    fn default() -> Self {
        UrlPolicy {
            require_https: true,
            allow_private_addresses: false,
        }
    }
}

/// Why a webhook URL is refused; the message is meant for the client that gave it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefusal {
    #[error("webhook_url is not a URL")]
    NotAUrl,
    #[error("webhook_url is longer than {max} bytes ({given} given)")]
    TooLong { max: usize, given: usize },
    #[error("webhook_url must use http or https")]
    Scheme,
    #[error("webhook_url must use https")]
    NotHttps,
    #[error("webhook_url has no host")]
    NoHost,
    #[error("webhook_url must not carry credentials")]
    Credentials,
    #[error("webhook_url must not carry a fragment")]
    Fragment,
    #[error("webhook_url resolves to a private address ({0})")]
    PrivateAddress(IpAddr),
    #[error("webhook_url cannot be resolved")]
    Unresolvable,
}

impl UrlPolicy {
    /// Checks what can be checked without the network: http or https (https when required),
    /// a host, no user or password, no fragment, at most [`MAX_URL_LEN`] bytes, and a host
    /// given as an IP address must not be forbidden.
    pub fn check_syntax(&self, url: &str) -> Result<Url, UrlRefusal> {
        if url.len() > MAX_URL_LEN {
            return Err(UrlRefusal::TooLong {
                max: MAX_URL_LEN,
                given: url.len(),
            });
        }
        let parsed = Url::parse(url).map_err(|error| match error {
            url::ParseError::EmptyHost => UrlRefusal::NoHost,
            _ => UrlRefusal::NotAUrl,
        })?;
        self.check_url(&parsed)?;
        Ok(parsed)
    }

    /// [`UrlPolicy::check_syntax`], then resolves the host (for at most 2 s) and refuses it
    /// when any of its addresses is forbidden.
    pub async fn check(&self, url: &str) -> Result<Url, UrlRefusal> {
        let parsed = self.check_syntax(url)?;
        if let Some(Host::Domain(name)) = parsed.host() {
            let addresses = resolve(name).await?;
            if !self.allow_private_addresses {
                if let Some(forbidden) = addresses
                    .iter()
                    .map(SocketAddr::ip)
                    .find(|ip| forbidden_address(*ip))
                {
                    return Err(UrlRefusal::PrivateAddress(forbidden));
                }
            }
        }
        Ok(parsed)
    }

    /// The syntax rules on a URL already parsed, as at send time.
    pub(super) fn check_url(&self, url: &Url) -> Result<(), UrlRefusal> {
        let len = url.as_str().len();
        if len > MAX_URL_LEN {
            return Err(UrlRefusal::TooLong {
                max: MAX_URL_LEN,
                given: len,
            });
        }
        match url.scheme() {
            "https" => {}
            "http" if !self.require_https => {}
            _ if self.require_https => return Err(UrlRefusal::NotHttps),
            _ => return Err(UrlRefusal::Scheme),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlRefusal::Credentials);
        }
        if url.fragment().is_some() {
            return Err(UrlRefusal::Fragment);
        }
        let literal = match url.host() {
            None => return Err(UrlRefusal::NoHost),
            Some(Host::Domain(_)) => None,
            Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        };
        match literal {
            Some(ip) if !self.allow_private_addresses && forbidden_address(ip) => {
                Err(UrlRefusal::PrivateAddress(ip))
            }
            _ => Ok(()),
        }
    }
}

/// The system resolver, bounded in time; an empty answer is no answer.
async fn resolve(name: &str) -> Result<Vec<SocketAddr>, UrlRefusal> {
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, 0))).await {
        Ok(Ok(addresses)) => {
            let addresses: Vec<SocketAddr> = addresses.collect();
            if addresses.is_empty() {
                Err(UrlRefusal::Unresolvable)
            } else {
                Ok(addresses)
            }
        }
        Ok(Err(_)) | Err(_) => Err(UrlRefusal::Unresolvable),
    }
}

/// IPv4 networks a webhook must not reach, as (network, prefix length).
const FORBIDDEN_V4: [(Ipv4Addr, u32); 15] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8), // "this network", the unspecified address
    (Ipv4Addr::new(10, 0, 0, 0), 8), // private
    (Ipv4Addr::new(100, 64, 0, 0), 10), // carrier-grade NAT
    (Ipv4Addr::new(127, 0, 0, 0), 8), // loopback
    (Ipv4Addr::new(169, 254, 0, 0), 16), // link-local, cloud metadata 169.254.169.254
    (Ipv4Addr::new(172, 16, 0, 0), 12), // private
    (Ipv4Addr::new(192, 0, 0, 0), 24), // IETF protocol assignments
    (Ipv4Addr::new(192, 0, 2, 0), 24), // documentation (TEST-NET-1)
    (Ipv4Addr::new(192, 88, 99, 0), 24), // 6to4 relay anycast
    (Ipv4Addr::new(192, 168, 0, 0), 16), // private
    (Ipv4Addr::new(198, 18, 0, 0), 15), // benchmarking
    (Ipv4Addr::new(198, 51, 100, 0), 24), // documentation (TEST-NET-2)
    (Ipv4Addr::new(203, 0, 113, 0), 24), // documentation (TEST-NET-3)
    (Ipv4Addr::new(224, 0, 0, 0), 4), // multicast
    (Ipv4Addr::new(240, 0, 0, 0), 4), // reserved, broadcast 255.255.255.255
];

/// IPv6 networks inside global unicast (2000::/3) that a webhook must not reach.
const FORBIDDEN_V6: [(Ipv6Addr, u32); 3] = [
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23), // IETF protocol assignments: Teredo, benchmarking, ORCHID
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32), // documentation
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20), // documentation
];

/// Whether a webhook must not be sent to `ip`: loopback, unspecified, private, carrier-grade
/// NAT, link-local (cloud metadata included), multicast, broadcast, reserved, documentation and
/// benchmarking ranges; for IPv6 everything outside global unicast 2000::/3 (ULA fc00::/7 with
/// fd00:ec2::254, link-local fe80::/10, multicast ff00::/8, …) and the special ranges inside
/// it; and IPv6 addresses that carry an IPv4 one (mapped, compatible, translated, NAT64
/// 64:ff9b::/96, 6to4) whenever that IPv4 address is forbidden.
pub fn forbidden_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => forbidden_v4(ip),
        IpAddr::V6(ip) => forbidden_v6(ip),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let bits = u32::from(ip);
    FORBIDDEN_V4
        .iter()
        .any(|&(network, len)| bits & (u32::MAX << (32 - len)) == u32::from(network))
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    if ip.is_unspecified() || ip.is_loopback() {
        return true;
    }
    if let Some(embedded) = embedded_v4(ip) {
        return forbidden_v4(embedded);
    }
    let bits = u128::from(ip);
    let within =
        |network: Ipv6Addr, len: u32| bits & (u128::MAX << (128 - len)) == u128::from(network);
    !within(Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3)
        || FORBIDDEN_V6
            .iter()
            .any(|&(network, len)| within(network, len))
}

/// The IPv4 address that an IPv6 address stands for, where it stands for one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let [a, b, c, d, e, f, g, h] = ip.segments();
    let low = Ipv4Addr::from((u32::from(g) << 16) | u32::from(h));
    match [a, b, c, d, e, f] {
        [0, 0, 0, 0, 0, 0xffff] => Some(low), // IPv4-mapped ::ffff:a.b.c.d
        [0, 0, 0, 0, 0, 0] => Some(low),      // IPv4-compatible ::a.b.c.d
        [0, 0, 0, 0, 0xffff, 0] => Some(low), // IPv4-translated ::ffff:0:a.b.c.d
        [0x64, 0xff9b, 0, 0, 0, 0] => Some(low), // NAT64 64:ff9b::a.b.c.d
        [0x2002, ..] => Some(Ipv4Addr::from((u32::from(b) << 16) | u32::from(c))), // 6to4
        _ => None,
    }
}

/// A resolver for reqwest that drops forbidden addresses when a webhook is sent, so that a
/// name checked when it was given cannot be rebound to an internal address afterwards. It
/// fails when no address remains. Hosts written as IP addresses never reach a resolver;
/// [`super::WebhookClient`] checks those itself.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    allow_private_addresses: bool,
}

impl GuardedResolver {
    pub fn new(policy: UrlPolicy) -> GuardedResolver {
        GuardedResolver {
            allow_private_addresses: policy.allow_private_addresses,
        }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private_addresses = self.allow_private_addresses;
        Box::pin(async move {
            let addresses = resolve(name.as_str()).await?;
            let kept = if allow_private_addresses {
                addresses
            } else {
                public_only(addresses)?
            };
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

/// The addresses that are not forbidden; refused, naming the first, when none are.
fn public_only(addresses: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, UrlRefusal> {
    let first = addresses.first().map(SocketAddr::ip);
    let kept: Vec<SocketAddr> = addresses
        .into_iter()
        .filter(|address| !forbidden_address(address.ip()))
        .collect();
    match first {
        Some(first) if kept.is_empty() => Err(UrlRefusal::PrivateAddress(first)),
        None => Err(UrlRefusal::Unresolvable),
        Some(_) => Ok(kept),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: UrlPolicy = UrlPolicy {
        require_https: false,
        allow_private_addresses: false,
    };
    const LOCAL: UrlPolicy = UrlPolicy {
        require_https: false,
        allow_private_addresses: true,
    };

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("a valid address in the table")
    }

    #[test]
    fn forbids_internal_addresses() {
        let forbidden = [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "169.254.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fd00:ec2::254",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
            "100::1",
            "64:ff9b:1::1",
            "2001::1",
            "2001:2::1",
            "2001:db8::1",
            "3fff::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:0:192.168.0.1",
            "::127.0.0.1",
            "::10.1.1.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:c0a8:0101::1",
        ];
        for address in forbidden {
            assert!(
                forbidden_address(ip(address)),
                "{address} must be forbidden"
            );
        }
    }

    #[test]
    fn allows_public_addresses() {
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "9.255.255.255",
            "11.0.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.255.255",
            "172.32.0.1",
            "192.169.0.1",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ];
        for address in allowed {
            assert!(!forbidden_address(ip(address)), "{address} must be allowed");
        }
    }

    #[test]
    fn check_syntax_refuses_what_it_can_see() {
        let https = UrlPolicy::default();
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        let cases: [(&UrlPolicy, &str, UrlRefusal); 13] = [
            (&https, "not a url", UrlRefusal::NotAUrl),
            (&https, "", UrlRefusal::NotAUrl),
            (&https, "http://example.com/hook", UrlRefusal::NotHttps),
            (&https, "ftp://example.com/hook", UrlRefusal::NotHttps),
            (&OPEN, "ftp://example.com/hook", UrlRefusal::Scheme),
            (&OPEN, "file:///etc/passwd", UrlRefusal::Scheme),
            (&https, "https://", UrlRefusal::NoHost),
            (
                &https,
                "https://user:pass@example.com/",
                UrlRefusal::Credentials,
            ),
            (&https, "https://user@example.com/", UrlRefusal::Credentials),
            (&https, "https://example.com/#part", UrlRefusal::Fragment),
            (
                &https,
                "https://127.0.0.1/",
                UrlRefusal::PrivateAddress(ip("127.0.0.1")),
            ),
            (
                &https,
                "https://[::ffff:169.254.169.254]/latest",
                UrlRefusal::PrivateAddress(ip("::ffff:a9fe:a9fe")),
            ),
            (
                &https,
                long.as_str(),
                UrlRefusal::TooLong {
                    max: MAX_URL_LEN,
                    given: long.len(),
                },
            ),
        ];
        for (policy, url, refusal) in cases {
            assert_eq!(policy.check_syntax(url), Err(refusal), "for {url:?}");
        }
    }

    #[test]
    fn check_syntax_reads_other_spellings_of_an_address() {
        let policy = UrlPolicy::default();
        for url in ["https://2130706433/", "https://0x7f.1/", "https://127.1/"] {
            assert_eq!(
                policy.check_syntax(url),
                Err(UrlRefusal::PrivateAddress(ip("127.0.0.1"))),
                "for {url}"
            );
        }
    }

    #[test]
    fn check_syntax_accepts_good_urls() {
        let policy = UrlPolicy::default();
        let url = policy
            .check_syntax("https://hooks.example.com:8443/sparkle?token=abc")
            .expect("a good URL");
        assert_eq!(url.host_str(), Some("hooks.example.com"));
        assert!(policy.check_syntax("https://8.8.8.8/hook").is_ok());
        assert!(policy
            .check_syntax("https://[2606:4700::1111]/hook")
            .is_ok());
        assert!(OPEN.check_syntax("http://example.com/hook").is_ok());
        assert!(LOCAL.check_syntax("http://127.0.0.1:8080/hook").is_ok());
    }

    #[test]
    fn refusals_read_well() {
        assert_eq!(
            UrlRefusal::PrivateAddress(ip("10.0.0.1")).to_string(),
            "webhook_url resolves to a private address (10.0.0.1)"
        );
        assert_eq!(
            UrlRefusal::NotHttps.to_string(),
            "webhook_url must use https"
        );
        assert_eq!(
            UrlRefusal::Unresolvable.to_string(),
            "webhook_url cannot be resolved"
        );
        assert_eq!(
            UrlRefusal::TooLong {
                max: 2048,
                given: 3000
            }
            .to_string(),
            "webhook_url is longer than 2048 bytes (3000 given)"
        );
    }

    #[tokio::test]
    async fn check_refuses_a_name_for_loopback_unless_allowed() {
        match OPEN.check("http://localhost:8080/hook").await {
            Err(UrlRefusal::PrivateAddress(address)) => assert!(address.is_loopback()),
            other => panic!("localhost must be refused, got {other:?}"),
        }
        let url = LOCAL
            .check("http://localhost:8080/hook")
            .await
            .expect("allowed when private addresses are");
        assert_eq!(url.port(), Some(8080));
    }

    #[tokio::test]
    async fn check_still_checks_syntax() {
        assert_eq!(
            UrlPolicy::default().check("http://localhost/").await,
            Err(UrlRefusal::NotHttps)
        );
        assert_eq!(
            OPEN.check("http://[::1]/").await,
            Err(UrlRefusal::PrivateAddress(ip("::1")))
        );
    }

    #[test]
    fn only_public_addresses_are_kept() {
        let at = |text: &str| SocketAddr::new(ip(text), 443);
        assert_eq!(
            public_only(vec![
                at("10.0.0.1"),
                at("8.8.8.8"),
                at("::1"),
                at("2606:4700::1111")
            ]),
            Ok(vec![at("8.8.8.8"), at("2606:4700::1111")])
        );
        assert_eq!(
            public_only(vec![at("169.254.169.254"), at("fd00:ec2::254")]),
            Err(UrlRefusal::PrivateAddress(ip("169.254.169.254")))
        );
        assert_eq!(public_only(Vec::new()), Err(UrlRefusal::Unresolvable));
    }

    #[tokio::test]
    async fn the_resolver_drops_forbidden_addresses() {
        let name: Name = "localhost".parse().expect("a name");
        let error = match GuardedResolver::new(OPEN).resolve(name).await {
            Ok(addresses) => panic!(
                "localhost must not resolve, got {:?}",
                addresses.collect::<Vec<_>>()
            ),
            Err(error) => error,
        };
        match error.downcast_ref::<UrlRefusal>() {
            Some(UrlRefusal::PrivateAddress(address)) => assert!(address.is_loopback()),
            other => panic!("expected a private address refusal, got {other:?}"),
        }

        let name: Name = "localhost".parse().expect("a name");
        let addresses: Vec<SocketAddr> = GuardedResolver::new(LOCAL)
            .resolve(name)
            .await
            .expect("allowed when private addresses are")
            .collect();
        assert!(!addresses.is_empty());
        assert!(addresses.iter().all(|address| address.ip().is_loopback()));
    }
}

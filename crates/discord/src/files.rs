//! Files attached to a command (`/sparkle image:`), fetched from Discord's CDN: only from the
//! hosts Discord serves attachments from, over https, never following a redirect or a proxy,
//! within a byte bound checked before and during the download and a deadline.

use crate::interaction::AttachedFile;
use std::time::Duration;

/// The hosts Discord serves attachments from.
pub const DISCORD_FILE_HOSTS: &[&str] = &["cdn.discordapp.com", "media.discordapp.net"];

/// Fetches attached files from the allowed hosts.
#[derive(Debug, Clone)]
pub struct AttachedFiles {
    http: reqwest::Client,
    /// `host` or `host:port` entries a file's URL must name.
    hosts: Vec<String>,
    https_only: bool,
}

impl AttachedFiles {
    /// `hosts` (`host` or `host:port`); `https_only` refuses plain http (always, outside
    /// tests that serve files on loopback).
    pub fn new(hosts: Vec<String>, https_only: bool) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(true)
            .min_tls_version(reqwest::tls::Version::TLS_1_2)
            .https_only(https_only)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(AttachedFiles {
            http,
            hosts,
            https_only,
        })
    }

    /// Whether `url` is one this fetcher takes files from.
    fn allowed(&self, url: &reqwest::Url) -> bool {
        let scheme_ok = url.scheme() == "https" || (!self.https_only && url.scheme() == "http");
        let Some(host) = url.host_str() else {
            return false;
        };
        let with_port = url.port().map(|p| format!("{host}:{p}"));
        scheme_ok
            && url.username().is_empty()
            && url.password().is_none()
            && self
                .hosts
                .iter()
                .any(|h| h == host || Some(h) == with_port.as_ref())
    }

    /// The file's bytes: at most `max_bytes`, within `deadline`. The reason it could not be
    /// had is written for the person who attached it.
    pub async fn fetch(
        &self,
        file: &AttachedFile,
        max_bytes: usize,
        deadline: Duration,
    ) -> Result<Vec<u8>, String> {
        let name = if file.filename.is_empty() {
            "the file"
        } else {
            &file.filename
        };
        if file.size > max_bytes as u64 {
            return Err(format!(
                "{name} is {} bytes; at most {max_bytes} are accepted",
                file.size
            ));
        }
        let url = reqwest::Url::parse(&file.url)
            .ok()
            .filter(|u| self.allowed(u))
            .ok_or_else(|| format!("{name} is not served by Discord"))?;
        let download = async {
            let mut answer = self
                .http
                .get(url)
                .send()
                .await
                .map_err(|e| format!("{name} could not be fetched: {}", e.without_url()))?;
            if !answer.status().is_success() {
                return Err(format!(
                    "{name} could not be fetched: Discord answered {}",
                    answer.status()
                ));
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = answer
                .chunk()
                .await
                .map_err(|e| format!("{name} could not be fetched: {}", e.without_url()))?
            {
                if bytes.len() + chunk.len() > max_bytes {
                    return Err(format!("{name} is larger than {max_bytes} bytes"));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(bytes)
        };
        tokio::time::timeout(deadline, download)
            .await
            .map_err(|_| format!("{name} took too long to fetch; try a smaller file"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(url: &str, size: u64) -> AttachedFile {
        AttachedFile {
            filename: "corgi.png".into(),
            size,
            url: url.into(),
            content_type: Some("image/png".into()),
        }
    }

    #[tokio::test]
    async fn only_discord_hosts_over_https_and_within_the_bound() {
        let files = AttachedFiles::new(
            DISCORD_FILE_HOSTS.iter().map(|h| h.to_string()).collect(),
            true,
        )
        .expect("client");
        let refusals = [
            (
                "https://evil.example/corgi.png",
                10,
                "not served by Discord",
            ),
            (
                "http://cdn.discordapp.com/a.png",
                10,
                "not served by Discord",
            ),
            (
                "https://user:pw@cdn.discordapp.com/a.png",
                10,
                "not served by Discord",
            ),
            (
                "https://cdn.discordapp.com.evil.example/a.png",
                10,
                "not served by Discord",
            ),
            (
                "https://169.254.169.254/latest",
                10,
                "not served by Discord",
            ),
            ("not a url", 10, "not served by Discord"),
            ("https://cdn.discordapp.com/a.png", 2_000, "2000 bytes"),
        ];
        for (url, size, why) in refusals {
            let err = files
                .fetch(&file(url, size), 1_000, Duration::from_secs(1))
                .await
                .expect_err(url);
            assert!(err.contains(why), "{url}: {err}");
        }
        let url = |u: &str| reqwest::Url::parse(u).expect("url");
        assert!(files.allowed(&url(
            "https://cdn.discordapp.com/attachments/1/2/a.png?ex=1"
        )));
        assert!(files.allowed(&url("https://media.discordapp.net/a.png")));
        let loopback = AttachedFiles::new(vec!["127.0.0.1:8080".into()], false).expect("client");
        assert!(loopback.allowed(&url("http://127.0.0.1:8080/a.png")));
        assert!(!loopback.allowed(&url("http://127.0.0.1:8081/a.png")));
    }
}

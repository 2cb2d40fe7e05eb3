//! Model downloads from the Hugging Face hub (or anything that speaks its API: a mirror, a
//! proxy, a test server).
//!
//! [`pull`] asks the hub for a repository's file list at a revision, keeps the files a
//! diffusers-layout pipeline needs (configs, tokenizers, safetensors weights — never pickled
//! `.bin`/`.ckpt` files, which can run code), and downloads each into `<file>.part`,
//! resuming from what a previous attempt left with an HTTP range request. A file becomes
//! visible under its real name only after its size and, for LFS files, its SHA-256 match
//! what the hub announced, so a model directory never holds a truncated or corrupted weight.

use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{name:?} is not a hub repository name (expected owner/name)")]
    BadName { name: String },
    #[error("{url} is not https: plain http is only for a hub on this machine (a test server)")]
    Insecure { url: String },
    #[error("{url}")]
    Http {
        url: String,
        #[source]
        error: reqwest::Error,
    },
    #[error("{url}: the hub answered {status}{hint}")]
    Status {
        url: String,
        status: u16,
        hint: &'static str,
    },
    #[error("{name} has no diffusers-layout files at {revision} (no model_index.json)")]
    NotDiffusers { name: String, revision: String },
    #[error("{path}: expected {expected}, got {found}; the download was discarded")]
    Verify {
        path: String,
        expected: String,
        found: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where and how to download.
#[derive(Clone)]
pub struct PullOptions {
    /// The hub's base URL (default `https://huggingface.co`, or `HF_ENDPOINT`).
    pub endpoint: String,
    pub revision: String,
    /// Prefer `*.fp16.safetensors` weights where the repository has them.
    pub fp16: bool,
    /// An access token for gated or private repositories.
    pub token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOptions")
            .field("endpoint", &self.endpoint)
            .field("revision", &self.revision)
            .field("fp16", &self.fp16)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            endpoint: std::env::var("HF_ENDPOINT")
                .unwrap_or_else(|_| "https://huggingface.co".into()),
            revision: "main".into(),
            fp16: false,
            token: std::env::var("HF_TOKEN").ok().map(Zeroizing::new),
        }
    }
}

/// Download progress, reported as bytes arrive.
pub trait Progress: Send {
    fn start_file(&mut self, path: &str, size: u64, already: u64);
    fn advance(&mut self, bytes: u64);
    fn finish_file(&mut self, path: &str);
}

/// Reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn start_file(&mut self, _: &str, _: u64, _: u64) {}
    fn advance(&mut self, _: u64) {}
    fn finish_file(&mut self, _: &str) {}
}

#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Clone, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Clone, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// What was downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    pub dir: PathBuf,
    pub revision: String,
    pub files: Vec<String>,
    pub bytes: u64,
}

/// Whether `url` is `http://` to this machine (`localhost` or a loopback address).
fn plain_to_loopback(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Downloads the diffusers-layout files of `name` into `dir`, resuming and verifying.
pub async fn pull(
    name: &str,
    dir: &Path,
    options: &PullOptions,
    progress: &mut dyn Progress,
) -> Result<Pulled, HubError> {
    let valid = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match name.split_once('/') {
        Some((owner, repo)) if valid(owner) && valid(repo) => {}
        _ => return Err(HubError::BadName { name: name.into() }),
    }
    let secure = options.endpoint.starts_with("https://");
    if !secure && !plain_to_loopback(&options.endpoint) {
        return Err(HubError::Insecure {
            url: options.endpoint.clone(),
        });
    }
    // Certificates verified against the webpki roots, TLS 1.2 at least, and an https hub
    // never followed to plain http (its downloads redirect to a CDN).
    let client = reqwest::Client::builder()
        .user_agent(concat!("sparkle/", env!("CARGO_PKG_VERSION")))
        .tls_built_in_root_certs(true)
        .min_tls_version(reqwest::tls::Version::TLS_1_2)
        .https_only(secure)
        .build()
        .map_err(|source| HubError::Http {
            url: options.endpoint.clone(),
            error: source.without_url(),
        })?;
    let endpoint = options.endpoint.trim_end_matches('/');
    let info_url = format!("{endpoint}/api/models/{name}/revision/{}", options.revision);
    let info: RepoInfo = get(&client, &info_url, options)
        .await?
        .json()
        .await
        .map_err(|source| HubError::Http {
            url: info_url.clone(),
            error: source.without_url(),
        })?;
    // Pin every file to the commit the listing came from, so a push mid-download cannot mix revisions.
    let revision = info.sha.clone().unwrap_or_else(|| options.revision.clone());
    let files = select(&info.siblings, options.fp16);
    if !files.iter().any(|f| f.rfilename == "model_index.json") {
        return Err(HubError::NotDiffusers {
            name: name.into(),
            revision: options.revision.clone(),
        });
    }
    let mut pulled = Pulled {
        dir: dir.to_path_buf(),
        revision: revision.clone(),
        files: Vec::new(),
        bytes: 0,
    };
    for file in files {
        let url = format!("{endpoint}/{name}/resolve/{revision}/{}", file.rfilename);
        let target = dir.join(&file.rfilename);
        pulled.bytes += download(&client, &url, &target, &file, options, progress).await?;
        pulled.files.push(file.rfilename.clone());
    }
    Ok(pulled)
}

/// The files a diffusers pipeline loads: configs, tokenizer files and safetensors weights,
/// one weight file per component (fp16 variants when asked for and present).
fn select(siblings: &[Sibling], fp16: bool) -> Vec<Sibling> {
    let safe_path = |p: &str| {
        !p.starts_with('/')
            && p.split('/')
                .all(|part| !part.is_empty() && part != ".." && part != ".")
    };
    let wanted = |p: &str| {
        let depth = p.matches('/').count();
        let name = p.rsplit('/').next().unwrap_or(p);
        (depth == 0 && name == "model_index.json")
            || (depth == 1
                && (name.ends_with(".json")
                    || name == "merges.txt"
                    || name == "vocab.json"
                    || name.ends_with(".safetensors")))
    };
    let mut chosen: Vec<Sibling> = siblings
        .iter()
        .filter(|s| safe_path(&s.rfilename) && wanted(&s.rfilename))
        .cloned()
        .collect();
    // One weight file per component: the fp16 variant when asked for and present, else the full one.
    let is_fp16 = |p: &str| p.ends_with(".fp16.safetensors");
    let component = |p: &str| p.split('/').next().unwrap_or_default().to_string();
    let has_fp16: Vec<String> = chosen
        .iter()
        .filter(|s| is_fp16(&s.rfilename))
        .map(|s| component(&s.rfilename))
        .collect();
    let has_full: Vec<String> = chosen
        .iter()
        .filter(|s| s.rfilename.ends_with(".safetensors") && !is_fp16(&s.rfilename))
        .map(|s| component(&s.rfilename))
        .collect();
    chosen.retain(|s| {
        let p = &s.rfilename;
        if !p.ends_with(".safetensors") {
            return true;
        }
        let c = component(p);
        if is_fp16(p) {
            fp16 || !has_full.contains(&c)
        } else {
            !(fp16 && has_fp16.contains(&c))
        }
    });
    chosen.sort_by(|a, b| a.rfilename.cmp(&b.rfilename));
    chosen
}

async fn get(
    client: &reqwest::Client,
    url: &str,
    options: &PullOptions,
) -> Result<reqwest::Response, HubError> {
    request(client, url, options, None).await
}

async fn request(
    client: &reqwest::Client,
    url: &str,
    options: &PullOptions,
    from: Option<u64>,
) -> Result<reqwest::Response, HubError> {
    let mut req = client.get(url);
    if let Some(token) = &options.token {
        req = req.bearer_auth(token.as_str());
    }
    if let Some(from) = from {
        req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
    }
    let response = req.send().await.map_err(|source| HubError::Http {
        url: url.into(),
        error: source.without_url(),
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let hint = match status.as_u16() {
        401 | 403 => " (gated or private: set HF_TOKEN)",
        404 => " (no such repository, revision or file)",
        _ => "",
    };
    Err(HubError::Status {
        url: url.into(),
        status: status.as_u16(),
        hint,
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Downloads one file to `<target>.part`, resuming, then verifies and renames it.
/// Returns the bytes transferred now.
async fn download(
    client: &reqwest::Client,
    url: &str,
    target: &Path,
    file: &Sibling,
    options: &PullOptions,
    progress: &mut dyn Progress,
) -> Result<u64, HubError> {
    let expected_size = file.lfs.as_ref().map(|l| l.size).or(file.size);
    if let Some(dir) = target.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
    }
    if target.exists() && verify(target, file).await.is_ok() {
        return Ok(0);
    }
    let part = target.with_extension(format!(
        "{}.part",
        target.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut have = tokio::fs::metadata(&part)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    if expected_size.is_some_and(|size| have > size) {
        have = 0;
    }
    let response = if expected_size == Some(have) {
        None
    } else {
        Some(request(client, url, options, (have > 0).then_some(have)).await?)
    };
    let mut transferred = 0;
    if let Some(response) = response {
        // A server that ignores the range sends the whole file: start over.
        let resumed = response.status() == reqwest::StatusCode::PARTIAL_CONTENT;
        if !resumed {
            have = 0;
        }
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .append(resumed)
            .write(true)
            .truncate(!resumed)
            .open(&part)
            .await
            .map_err(io(&part))?;
        progress.start_file(&file.rfilename, expected_size.unwrap_or(0), have);
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| HubError::Http {
                url: url.into(),
                error: source.without_url(),
            })?;
            out.write_all(&chunk).await.map_err(io(&part))?;
            transferred += chunk.len() as u64;
            progress.advance(chunk.len() as u64);
        }
        out.flush().await.map_err(io(&part))?;
        out.sync_all().await.map_err(io(&part))?;
    }
    if let Err(e) = verify(&part, file).await {
        // A corrupt partial file would poison every later resume.
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e);
    }
    tokio::fs::rename(&part, target).await.map_err(io(target))?;
    progress.finish_file(&file.rfilename);
    Ok(transferred)
}

/// Checks size, and SHA-256 for LFS files, against what the hub announced.
async fn verify(path: &Path, file: &Sibling) -> Result<(), HubError> {
    let mismatch = |expected: String, found: String| HubError::Verify {
        path: file.rfilename.clone(),
        expected,
        found,
    };
    let size = tokio::fs::metadata(path).await.map_err(io(path))?.len();
    let expected = file.lfs.as_ref().map(|l| l.size).or(file.size);
    if let Some(expected) = expected {
        if size != expected {
            return Err(mismatch(
                format!("{expected} bytes"),
                format!("{size} bytes"),
            ));
        }
    }
    if let Some(lfs) = &file.lfs {
        let mut reader = tokio::fs::File::open(path).await.map_err(io(path))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader.read(&mut buf).await.map_err(io(path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let found = hex::encode(hasher.finalize());
        if !found.eq_ignore_ascii_case(&lfs.sha256) {
            return Err(mismatch(
                format!("sha256 {}", lfs.sha256),
                format!("sha256 {found}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

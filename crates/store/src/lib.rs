//! The image store: generated images by job and index, over any `object_store` backend
//! (a local directory by default, S3-compatible stores when one machine is not enough).
//!
//! Every image is sealed ([`sparkle_seal`]) before it leaves this crate and opened after it comes
//! back: a store, its disks and its backups only ever hold ciphertext bound to the object's
//! name. Names are derived from the job id, which is random and never guessable; images are
//! served only through the gateway, never by path, to an API key or to the holder of a
//! signed, expiring link ([`links`]) made with the same master keys. The store knows nothing
//! of the queue.

pub mod links;
pub mod worker_tokens;

pub use links::{ImageLinks, LinkQuery, LinkRefusal, SignedLink};
pub use worker_tokens::{WorkerTokenRefusal, WorkerTokens};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{local::LocalFileSystem, path::Path as ObjectPath, ObjectStore, PutPayload};
use sparkle_core::JobId;
use sparkle_seal::{MasterKeyId, MasterKeys, SealError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where an S3-compatible store is and how to reach it.
pub struct S3Options {
    /// `s3://BUCKET[/PREFIX]`.
    pub url: String,
    /// `https://HOST[:PORT]` of an S3-compatible service; unset: AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// The CA that signed the endpoint's certificate; unset: the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Access key id and secret; unset: the standard AWS chain (environment, web identity,
    /// instance metadata).
    pub credentials: Option<(String, zeroize::Zeroizing<String>)>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot prepare the image directory {path}: {source}")]
    Directory {
        path: String,
        source: std::io::Error,
    },
    #[error("image store: {0}")]
    Backend(#[from] object_store::Error),
    #[error("{0}")]
    Config(String),
    #[error("image {name}: {source}")]
    Seal { name: String, source: SealError },
    #[error("image {name} could not be synced to disk: {source}")]
    Sync {
        name: String,
        source: std::io::Error,
    },
}

/// Which image of a job: what links and clients name. Where it is stored also depends on the
/// attempt that made it (see [`ImageStore::put`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageKey {
    pub job: JobId,
    pub index: u32,
}

/// Where image `key`, made by `attempt`, lives: `images/{job}/a{attempt}/{index}.png`, so an
/// attempt that lost its lease never overwrites the images another attempt completed the
/// job with. Images stored before attempts named them (`attempt` `None`) live at
/// `images/{job}/{index}.png`.
fn object_path(key: ImageKey, attempt: Option<u32>) -> ObjectPath {
    match attempt {
        Some(a) => ObjectPath::from(format!("images/{}/a{a}/{}.png", key.job, key.index)),
        None => ObjectPath::from(format!("images/{}/{}.png", key.job, key.index)),
    }
}

fn job_prefix(job: JobId) -> ObjectPath {
    ObjectPath::from(format!("images/{job}"))
}

/// Where the source image a job starts from lives (image-to-image, inpainting).
fn source_path(job: JobId) -> ObjectPath {
    ObjectPath::from(format!("sources/{job}.png"))
}

/// The prefixes every sealed object lives under.
const SEALED_PREFIXES: [&str; 2] = ["images", "sources"];

/// The image an object path names, if it is one.
fn parse_object_path(path: &ObjectPath) -> Option<(ImageKey, Option<u32>)> {
    let parts: Vec<_> = path.parts().collect();
    let (job, attempt, file) = match parts.as_slice() {
        [root, job, file] if root.as_ref() == "images" => (job, None, file),
        [root, job, attempt, file] if root.as_ref() == "images" => {
            let a = attempt.as_ref().strip_prefix('a')?.parse().ok()?;
            (job, Some(a), file)
        }
        _ => return None,
    };
    let job = job.as_ref().parse().ok()?;
    let index = file.as_ref().strip_suffix(".png")?.parse().ok()?;
    Some((ImageKey { job, index }, attempt))
}

/// One stored image, as a listing finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredImage {
    pub key: ImageKey,
    /// The attempt that made it (`None`: stored before attempts named images).
    pub attempt: Option<u32>,
    /// When it was written, in Unix milliseconds.
    pub modified_ms: i64,
}

#[async_trait]
pub trait ImageStore: Send + Sync + 'static {
    /// Stores image `key` as made by `attempt`, durably before it returns (a job is marked
    /// done only after), replacing an earlier copy by the same attempt.
    async fn put(&self, key: ImageKey, attempt: Option<u32>, png: Bytes) -> Result<(), StoreError>;
    /// The image made by `attempt`, or `None` if there is none.
    async fn get(&self, key: ImageKey, attempt: Option<u32>) -> Result<Option<Bytes>, StoreError>;
    /// Removes every image `attempt` made of `job`; returns how many there were.
    async fn delete_attempt(&self, job: JobId, attempt: Option<u32>) -> Result<u64, StoreError>;
    /// Removes every image of `job`, whichever attempt made it; returns how many there were.
    async fn delete_job(&self, job: JobId) -> Result<u64, StoreError>;
    /// Every stored image.
    async fn list(&self) -> Result<Vec<StoredImage>, StoreError>;
    /// Stores the source image `job` starts from, durably, before the job is enqueued.
    async fn put_source(&self, job: JobId, png: Bytes) -> Result<(), StoreError>;
    /// The source image `job` starts from, or `None`.
    async fn get_source(&self, job: JobId) -> Result<Option<Bytes>, StoreError>;
    /// Every stored source image: its job, and when it was written (Unix milliseconds).
    async fn list_sources(&self) -> Result<Vec<(JobId, i64)>, StoreError>;
}

/// Which master keys the stored objects are sealed under.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUsage {
    /// Objects per master key id.
    pub by_key: BTreeMap<MasterKeyId, u64>,
    /// Objects written before images were sealed.
    pub unsealed: u64,
}

/// What [`ObjectImageStore::rewrap_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewrapped {
    /// Headers rewritten to the active key (chunks untouched).
    pub rewrapped: u64,
    /// Objects from before sealing, sealed now.
    pub sealed: u64,
    /// Objects already under the active key.
    pub current: u64,
}

/// An [`ImageStore`] over any `object_store` backend, sealing every image.
#[derive(Debug, Clone)]
pub struct ObjectImageStore {
    inner: Arc<dyn ObjectStore>,
    keys: Arc<MasterKeys>,
    /// The directory of a local store, whose writes are synced to disk before they count.
    local_root: Option<PathBuf>,
}

fn seal_error(name: &ObjectPath) -> impl FnOnce(SealError) -> StoreError + '_ {
    move |source| StoreError::Seal {
        name: name.to_string(),
        source,
    }
}

/// The setting that asks for server-side encryption on every write.
fn sse_key() -> object_store::aws::AmazonS3ConfigKey {
    match "aws_server_side_encryption".parse() {
        Ok(key) => key,
        Err(_) => unreachable!("object_store names the server-side encryption setting"),
    }
}

impl ObjectImageStore {
    pub fn new(inner: Arc<dyn ObjectStore>, keys: Arc<MasterKeys>) -> Self {
        ObjectImageStore {
            inner,
            keys,
            local_root: None,
        }
    }

    /// A store in a local directory, created (owner-only) if missing.
    pub fn local(dir: &Path, keys: Arc<MasterKeys>) -> Result<Self, StoreError> {
        let directory = |source| StoreError::Directory {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(directory)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(directory)?;
        }
        let fs = LocalFileSystem::new_with_prefix(dir)?.with_automatic_cleanup(true);
        let mut store = ObjectImageStore::new(Arc::new(fs), keys);
        store.local_root = Some(dir.canonicalize().map_err(directory)?);
        Ok(store)
    }

    /// A store in an S3-compatible bucket: `url` is `s3://BUCKET[/PREFIX]`. TLS is always
    /// verified (against `s3.ca_file` when given, the system's roots otherwise), plaintext
    /// endpoints are refused, and server-side encryption (SSE-S3) is asked for on every
    /// write, beneath the sealing every image gets here.
    pub fn s3(s3: &S3Options, keys: Arc<MasterKeys>) -> Result<Self, StoreError> {
        use object_store::aws::AmazonS3Builder;
        let invalid = |reason: String| StoreError::Config(reason);
        let rest = s3
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| invalid("store.url must be s3://BUCKET[/PREFIX]".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("store.url names no bucket".into()));
        }
        let mut options = object_store::ClientOptions::new().with_allow_http(false);
        if let Some(path) = &s3.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| invalid(format!("store.ca_file {}: {e}", path.display())))?;
            let certificate = object_store::Certificate::from_pem(&pem)
                .map_err(|e| invalid(format!("store.ca_file {}: {e}", path.display())))?;
            options = options.with_root_certificate(certificate);
        }
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_client_options(options)
            .with_config(sse_key(), "AES256");
        if let Some(endpoint) = &s3.endpoint {
            if !endpoint.starts_with("https://") {
                return Err(invalid("store.endpoint must be https://".into()));
            }
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        if let Some(region) = &s3.region {
            builder = builder.with_region(region);
        }
        if let Some((id, secret)) = &s3.credentials {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret.as_str());
        }
        let bucket_store: Arc<dyn ObjectStore> = Arc::new(builder.build()?);
        let inner: Arc<dyn ObjectStore> = if prefix.trim_matches('/').is_empty() {
            bucket_store
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(
                bucket_store,
                prefix.trim_matches('/'),
            ))
        };
        Ok(ObjectImageStore::new(inner, keys))
    }

    /// Counts the stored images by the master key they are sealed under, reading only
    /// their headers.
    pub async fn key_usage(&self) -> Result<KeyUsage, StoreError> {
        let mut usage = KeyUsage::default();
        let mut objects = futures::stream::iter(SEALED_PREFIXES)
            .map(|prefix| self.inner.list(Some(&ObjectPath::from(prefix))))
            .flatten();
        while let Some(meta) = objects.try_next().await? {
            let end = meta.size.min(sparkle_seal::HEADER_MAX as u64);
            let start = self.inner.get_range(&meta.location, 0..end).await?;
            match sparkle_seal::header_key_id(&start) {
                Ok(id) => *usage.by_key.entry(id).or_default() += 1,
                Err(SealError::NotSealed) => usage.unsealed += 1,
                Err(e) => return Err(seal_error(&meta.location)(e)),
            }
        }
        Ok(usage)
    }

    /// Rewrites every image not under the active master key with its data key wrapped by
    /// the active key (the chunks are copied, not re-encrypted), and seals images stored
    /// before sealing.
    pub async fn rewrap_all(&self) -> Result<Rewrapped, StoreError> {
        let ring = self.keys.current();
        let mut done = Rewrapped::default();
        let mut objects = futures::stream::iter(SEALED_PREFIXES)
            .map(|prefix| self.inner.list(Some(&ObjectPath::from(prefix))))
            .flatten();
        while let Some(meta) = objects.try_next().await? {
            let name = meta.location;
            let end = meta.size.min(sparkle_seal::HEADER_MAX as u64);
            let start = self.inner.get_range(&name, 0..end).await?;
            let rewritten = match sparkle_seal::header_key_id(&start) {
                Ok(id) if &id == ring.active_id() => {
                    done.current += 1;
                    continue;
                }
                Ok(_) => {
                    let sealed = self.inner.get(&name).await?.bytes().await?;
                    match sparkle_seal::rewrap(&ring, name.as_ref(), &sealed)
                        .map_err(seal_error(&name))?
                    {
                        Some(object) => {
                            done.rewrapped += 1;
                            object
                        }
                        None => {
                            done.current += 1;
                            continue;
                        }
                    }
                }
                Err(SealError::NotSealed) => {
                    let plain = self.inner.get(&name).await?.bytes().await?;
                    done.sealed += 1;
                    sparkle_seal::seal(&ring, name.as_ref(), &plain).map_err(seal_error(&name))?
                }
                Err(e) => return Err(seal_error(&name)(e)),
            };
            self.inner
                .put(&name, PutPayload::from(Bytes::from(rewritten)))
                .await?;
            self.sync_local(&name).await?;
        }
        Ok(done)
    }
}

impl ObjectImageStore {
    /// Seals `plain` bound to its name and stores it, durably.
    async fn put_sealed(&self, name: &ObjectPath, plain: &[u8]) -> Result<(), StoreError> {
        let sealed = sparkle_seal::seal(&self.keys.current(), name.as_ref(), plain)
            .map_err(seal_error(name))?;
        self.inner
            .put(name, PutPayload::from(Bytes::from(sealed)))
            .await?;
        self.sync_local(name).await
    }

    /// The object at `name`, opened, or `None`.
    async fn get_opened(&self, name: &ObjectPath) -> Result<Option<Bytes>, StoreError> {
        let sealed = match self.inner.get(name).await {
            Ok(found) => found.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let plain =
            sparkle_seal::open(&self.keys, name.as_ref(), &sealed).map_err(seal_error(name))?;
        Ok(Some(Bytes::from(plain)))
    }

    /// Makes a local write durable: the file, then every directory from its own up to the
    /// store's root (a new job's directories are entries in their parents).
    async fn sync_local(&self, name: &ObjectPath) -> Result<(), StoreError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let relative: PathBuf = name.parts().map(|p| p.as_ref().to_string()).collect();
        let file = root.join(&relative);
        let synced = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::File::open(&file)?.sync_all()?;
            let mut dir = file.parent();
            while let Some(d) = dir {
                std::fs::File::open(d)?.sync_all()?;
                if d == root {
                    break;
                }
                dir = d.parent();
            }
            Ok(())
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|r| r);
        synced.map_err(|source| StoreError::Sync {
            name: name.to_string(),
            source,
        })
    }

    async fn delete_under(&self, prefix: &ObjectPath, nested: bool) -> Result<u64, StoreError> {
        let names: Vec<ObjectPath> = if nested {
            self.inner
                .list(Some(prefix))
                .map_ok(|meta| meta.location)
                .try_collect()
                .await?
        } else {
            self.inner
                .list_with_delimiter(Some(prefix))
                .await?
                .objects
                .into_iter()
                .map(|meta| meta.location)
                .collect()
        };
        let mut removed = 0;
        for name in names {
            match self.inner.delete(&name).await {
                Ok(()) => removed += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(removed)
    }
}

#[async_trait]
impl ImageStore for ObjectImageStore {
    async fn put(&self, key: ImageKey, attempt: Option<u32>, png: Bytes) -> Result<(), StoreError> {
        self.put_sealed(&object_path(key, attempt), &png).await
    }

    async fn get(&self, key: ImageKey, attempt: Option<u32>) -> Result<Option<Bytes>, StoreError> {
        self.get_opened(&object_path(key, attempt)).await
    }

    async fn put_source(&self, job: JobId, png: Bytes) -> Result<(), StoreError> {
        self.put_sealed(&source_path(job), &png).await
    }

    async fn get_source(&self, job: JobId) -> Result<Option<Bytes>, StoreError> {
        self.get_opened(&source_path(job)).await
    }

    async fn list_sources(&self) -> Result<Vec<(JobId, i64)>, StoreError> {
        let mut found = Vec::new();
        let mut objects = self.inner.list(Some(&ObjectPath::from("sources")));
        while let Some(meta) = objects.try_next().await? {
            let job = meta
                .location
                .filename()
                .and_then(|f| f.strip_suffix(".png"))
                .and_then(|id| id.parse().ok());
            if let Some(job) = job {
                found.push((job, meta.last_modified.timestamp_millis()));
            }
        }
        Ok(found)
    }

    async fn delete_attempt(&self, job: JobId, attempt: Option<u32>) -> Result<u64, StoreError> {
        match attempt {
            Some(a) => {
                let prefix = ObjectPath::from(format!("images/{job}/a{a}"));
                self.delete_under(&prefix, true).await
            }
            None => self.delete_under(&job_prefix(job), false).await,
        }
    }

    async fn delete_job(&self, job: JobId) -> Result<u64, StoreError> {
        let images = self.delete_under(&job_prefix(job), true).await?;
        match self.inner.delete(&source_path(job)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(images),
            Err(e) => Err(e.into()),
        }
    }

    async fn list(&self) -> Result<Vec<StoredImage>, StoreError> {
        let mut found = Vec::new();
        let mut objects = self.inner.list(Some(&ObjectPath::from("images")));
        while let Some(meta) = objects.try_next().await? {
            if let Some((key, attempt)) = parse_object_path(&meta.location) {
                found.push(StoredImage {
                    key,
                    attempt,
                    modified_ms: meta.last_modified.timestamp_millis(),
                });
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparkle_seal::Keyring;

    const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

    fn local(dir: &Path, ring: Keyring) -> ObjectImageStore {
        ObjectImageStore::local(&dir.join("images"), Arc::new(MasterKeys::fixed(ring)))
            .expect("store")
    }

    fn files(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(files(&path));
            } else {
                found.push(path);
            }
        }
        found
    }

    fn key(index: u32) -> ImageKey {
        ImageKey {
            job: JobId::random(),
            index,
        }
    }

    #[tokio::test]
    async fn images_round_trip_and_missing_ones_are_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = local(dir.path(), Keyring::generate(1));
        let key = key(0);
        assert!(store.get(key, Some(1)).await.expect("get").is_none());
        store
            .put(key, Some(1), Bytes::from_static(b"png bytes"))
            .await
            .expect("put");
        store
            .put(key, Some(1), Bytes::from_static(b"png again"))
            .await
            .expect("overwrite");
        assert_eq!(
            store.get(key, Some(1)).await.expect("get").as_deref(),
            Some(&b"png again"[..])
        );
        assert!(store
            .get(ImageKey { index: 1, ..key }, Some(1))
            .await
            .expect("get")
            .is_none());
    }

    #[tokio::test]
    async fn a_source_image_is_sealed_kept_with_its_job_and_removed_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = local(dir.path(), Keyring::generate(1));
        let image = key(0);
        let job = image.job;
        assert!(store.get_source(job).await.expect("get").is_none());
        let mut png = PNG_SIGNATURE.to_vec();
        png.extend_from_slice(b"a source picture of a corgi");
        store
            .put_source(job, Bytes::from(png.clone()))
            .await
            .expect("put");
        store
            .put(image, Some(1), Bytes::from_static(b"made"))
            .await
            .expect("image");
        assert_eq!(
            store.get_source(job).await.expect("get").as_deref(),
            Some(&png[..])
        );
        for file in files(dir.path()) {
            let bytes = std::fs::read(&file).expect("read");
            assert!(bytes.starts_with(sparkle_seal::MAGIC), "{}", file.display());
            assert!(!bytes.windows(5).any(|w| w == b"corgi"));
        }
        let listed = store.list_sources().await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, job);
        // Not an image of the job: the sweep of images never sees it.
        assert_eq!(store.list().await.expect("list").len(), 1);
        let usage = store.key_usage().await.expect("usage");
        assert_eq!(usage.by_key.values().sum::<u64>(), 2);
        assert_eq!(store.delete_job(job).await.expect("delete"), 1);
        assert!(store.get_source(job).await.expect("get").is_none());
        assert!(store.list_sources().await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn the_disk_holds_only_ciphertext_bound_to_its_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = local(dir.path(), Keyring::generate(1));
        let mut png = PNG_SIGNATURE.to_vec();
        png.extend_from_slice(b"IHDR a picture of a corgi");
        let (a, b) = (key(0), key(0));
        store
            .put(a, Some(1), Bytes::from(png.clone()))
            .await
            .expect("put");
        store
            .put(b, Some(1), Bytes::from_static(b"other"))
            .await
            .expect("put");
        for file in files(dir.path()) {
            let bytes = std::fs::read(&file).expect("read");
            assert!(bytes.starts_with(sparkle_seal::MAGIC), "{}", file.display());
            assert!(!bytes.windows(8).any(|w| w == PNG_SIGNATURE));
            assert!(!bytes.windows(5).any(|w| w == b"corgi"));
        }
        // Copy a's object over b's: b no longer opens.
        let path = |k: ImageKey| dir.path().join(format!("images/images/{}/a1/0.png", k.job));
        std::fs::copy(path(a), path(b)).expect("copy");
        let err = store.get(b, Some(1)).await.expect_err("swapped");
        assert!(matches!(
            err,
            StoreError::Seal {
                source: SealError::Unwrap,
                ..
            }
        ));
        let mut bytes = std::fs::read(path(a)).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(path(a), bytes).expect("write");
        assert!(store.get(a, Some(1)).await.is_err(), "a flipped bit");
    }

    #[tokio::test]
    async fn rotation_rewraps_headers_and_old_images_open_throughout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ring = Keyring::generate(1);
        let first = ring.active_id().clone();
        let store = local(dir.path(), ring.clone());
        let keys: Vec<_> = (0..3).map(key).collect();
        for (i, k) in keys.iter().enumerate() {
            let image = vec![i as u8; sparkle_seal::CHUNK_SIZE * 2 + i];
            store
                .put(*k, Some(1), Bytes::from(image))
                .await
                .expect("put");
        }
        let bodies = |dir: &Path| {
            let mut all: Vec<Vec<u8>> = files(dir)
                .iter()
                .map(|f| {
                    let bytes = std::fs::read(f).expect("read");
                    let id = sparkle_seal::header_key_id(&bytes).expect("sealed");
                    bytes[75 + id.as_str().len()..].to_vec()
                })
                .collect();
            all.sort();
            all
        };
        let before = bodies(dir.path());

        let second = ring.rotate(2);
        let store = local(dir.path(), ring.clone());
        let usage = store.key_usage().await.expect("usage");
        assert_eq!(usage.by_key.get(&first), Some(&3));
        let mut retiring = ring.clone();
        retiring.retire(&first, 3).expect("retire");
        let too_early = local(dir.path(), retiring);
        assert!(
            too_early.get(keys[0], Some(1)).await.is_err(),
            "a retired key opens nothing: retire only what no object uses"
        );
        for (i, k) in keys.iter().enumerate() {
            let image = store.get(*k, Some(1)).await.expect("get").expect("present");
            assert_eq!(
                image.len(),
                sparkle_seal::CHUNK_SIZE * 2 + i,
                "old key still opens"
            );
        }
        let done = store.rewrap_all().await.expect("rewrap");
        assert_eq!((done.rewrapped, done.current, done.sealed), (3, 0, 0));
        assert_eq!(bodies(dir.path()), before, "chunks untouched");
        let usage = store.key_usage().await.expect("usage");
        assert_eq!(usage.by_key.into_iter().collect::<Vec<_>>(), [(second, 3)]);
        assert_eq!(store.rewrap_all().await.expect("again").current, 3);

        ring.retire(&first, 3).expect("retire");
        let store = local(dir.path(), ring);
        for k in &keys {
            assert!(store.get(*k, Some(1)).await.expect("get").is_some());
        }
    }

    #[tokio::test]
    async fn images_from_before_sealing_are_sealed_by_a_rewrap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = local(dir.path(), Keyring::generate(1));
        let k = key(0);
        let legacy = dir.path().join(format!("images/images/{}/0.png", k.job));
        std::fs::create_dir_all(legacy.parent().expect("parent")).expect("mkdir");
        std::fs::write(&legacy, PNG_SIGNATURE).expect("write");
        assert!(
            store.get(k, None).await.is_err(),
            "an unsealed object is refused"
        );
        assert_eq!(store.key_usage().await.expect("usage").unsealed, 1);
        assert_eq!(store.rewrap_all().await.expect("rewrap").sealed, 1);
        assert_eq!(
            store.get(k, None).await.expect("get").as_deref(),
            Some(PNG_SIGNATURE)
        );
        assert!(std::fs::read(&legacy)
            .expect("read")
            .starts_with(sparkle_seal::MAGIC));
    }

    #[tokio::test]
    async fn an_attempt_never_overwrites_the_images_of_another() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = local(dir.path(), Keyring::generate(1));
        let k = key(0);
        store
            .put(k, Some(2), Bytes::from_static(b"the completed one"))
            .await
            .expect("put");
        // The attempt that lost its lease writes late, under its own name.
        store
            .put(k, Some(1), Bytes::from_static(b"a stale attempt"))
            .await
            .expect("put");
        assert_eq!(
            store.get(k, Some(2)).await.expect("get").as_deref(),
            Some(&b"the completed one"[..])
        );
        assert_eq!(
            store.delete_attempt(k.job, Some(1)).await.expect("delete"),
            1
        );
        assert!(store.get(k, Some(1)).await.expect("get").is_none());
        assert!(store.get(k, Some(2)).await.expect("get").is_some());
    }

    #[tokio::test]
    async fn listing_names_each_image_and_deleting_a_job_removes_all_of_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = local(dir.path(), Keyring::generate(1));
        let (a, b) = (key(0), key(0));
        for (k, attempt) in [
            (a, Some(1)),
            (ImageKey { index: 1, ..a }, Some(1)),
            (a, Some(3)),
        ] {
            store
                .put(k, attempt, Bytes::from_static(b"x"))
                .await
                .expect("put");
        }
        store
            .put(b, None, Bytes::from_static(b"y"))
            .await
            .expect("put");
        let mut listed: Vec<_> = store
            .list()
            .await
            .expect("list")
            .into_iter()
            .map(|i| (i.key, i.attempt))
            .collect();
        listed.sort_by_key(|(k, attempt)| (k.job.to_string(), *attempt, k.index));
        let mut expected = vec![
            (a, Some(1)),
            (ImageKey { index: 1, ..a }, Some(1)),
            (a, Some(3)),
            (b, None),
        ];
        expected.sort_by_key(|(k, attempt)| (k.job.to_string(), *attempt, k.index));
        assert_eq!(listed, expected);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64;
        assert!(store
            .list()
            .await
            .expect("list")
            .iter()
            .all(|i| (now - i.modified_ms).abs() < 60_000));

        assert_eq!(store.delete_job(a.job).await.expect("delete"), 3);
        assert_eq!(store.delete_job(a.job).await.expect("again"), 0);
        assert_eq!(store.delete_attempt(b.job, None).await.expect("legacy"), 1);
        assert!(store.list().await.expect("list").is_empty());
        assert!(files(dir.path()).is_empty(), "no file is left behind");
    }
}

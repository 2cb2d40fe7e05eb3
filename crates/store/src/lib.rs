//! The image store: generated images by job and index, over any `object_store` backend
//! (a local directory by default, S3-compatible stores when one machine is not enough).
//!
//! Keys are derived from the job id, which is random and never guessable; images are served
//! only through the gateway, never by path. The store knows nothing of the queue.

use async_trait::async_trait;
use bytes::Bytes;
use object_store::{local::LocalFileSystem, path::Path as ObjectPath, ObjectStore, PutPayload};
use sparkle_core::JobId;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot prepare the image directory {path}: {source}")]
    Directory {
        path: String,
        source: std::io::Error,
    },
    #[error("image store: {0}")]
    Backend(#[from] object_store::Error),
}

/// Where image `index` of a job lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageKey {
    pub job: JobId,
    pub index: u32,
}

impl ImageKey {
    fn path(&self) -> ObjectPath {
        ObjectPath::from(format!("images/{}/{}.png", self.job, self.index))
    }
}

#[async_trait]
pub trait ImageStore: Send + Sync + 'static {
    /// Stores an image, replacing any earlier copy under the same key (a retried job
    /// writes the same keys again).
    async fn put(&self, key: ImageKey, png: Bytes) -> Result<(), StoreError>;
    /// The image, or `None` if there is none under this key.
    async fn get(&self, key: ImageKey) -> Result<Option<Bytes>, StoreError>;
}

/// An [`ImageStore`] over any `object_store` backend.
#[derive(Debug, Clone)]
pub struct ObjectImageStore {
    inner: Arc<dyn ObjectStore>,
}

impl ObjectImageStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        ObjectImageStore { inner }
    }

    /// A store in a local directory, created (owner-only) if missing.
    pub fn local(dir: &Path) -> Result<Self, StoreError> {
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
        let fs = LocalFileSystem::new_with_prefix(dir)?;
        Ok(ObjectImageStore::new(Arc::new(fs)))
    }
}

#[async_trait]
impl ImageStore for ObjectImageStore {
    async fn put(&self, key: ImageKey, png: Bytes) -> Result<(), StoreError> {
        self.inner.put(&key.path(), PutPayload::from(png)).await?;
        Ok(())
    }

    async fn get(&self, key: ImageKey) -> Result<Option<Bytes>, StoreError> {
        match self.inner.get(&key.path()).await {
            Ok(found) => Ok(Some(found.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn images_round_trip_and_missing_ones_are_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ObjectImageStore::local(&dir.path().join("images")).expect("store");
        let key = ImageKey {
            job: JobId::random(),
            index: 0,
        };
        assert!(store.get(key).await.expect("get").is_none());
        store
            .put(key, Bytes::from_static(b"png bytes"))
            .await
            .expect("put");
        store
            .put(key, Bytes::from_static(b"png again"))
            .await
            .expect("overwrite");
        assert_eq!(
            store.get(key).await.expect("get").as_deref(),
            Some(&b"png again"[..])
        );
        assert!(store
            .get(ImageKey { index: 1, ..key })
            .await
            .expect("get")
            .is_none());
    }
}

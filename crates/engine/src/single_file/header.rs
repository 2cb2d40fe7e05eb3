//! A safetensors file's header alone: tensor names, shapes and the free-form metadata,
//! read without mapping or reading the tensors (a checkpoint is gigabytes; its header a
//! few hundred kilobytes).

use crate::EngineError;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

/// The format's own limit on the header's size.
const MAX_HEADER: u64 = 100_000_000;

/// What a safetensors header says.
#[derive(Debug, Clone, Default)]
pub(crate) struct Header {
    /// Tensor name → shape.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// The `__metadata__` entries (e.g. ModelSpec's `modelspec.*`).
    pub metadata: HashMap<String, String>,
}

impl Header {
    pub fn read(file: &Path) -> Result<Self, EngineError> {
        let bad =
            |why: &str| EngineError::invalid_model(file, format!("not a safetensors file: {why}"));
        let mut reader = std::fs::File::open(file).map_err(|e| EngineError::io(file, e))?;
        let mut size = [0u8; 8];
        reader
            .read_exact(&mut size)
            .map_err(|_| bad("shorter than its header"))?;
        let size = u64::from_le_bytes(size);
        if size > MAX_HEADER {
            return Err(bad(&format!("a header of {size} bytes")));
        }
        let mut text = Vec::new();
        reader
            .take(size)
            .read_to_end(&mut text)
            .map_err(|e| EngineError::io(file, e))?;
        if text.len() as u64 != size {
            return Err(bad("shorter than its header"));
        }
        let value: Value =
            serde_json::from_slice(&text).map_err(|e| bad(&format!("its header: {e}")))?;
        let Value::Object(entries) = value else {
            return Err(bad("its header is not a JSON object"));
        };
        let mut header = Header::default();
        for (name, entry) in entries {
            if name == "__metadata__" {
                if let Value::Object(metadata) = entry {
                    header.metadata = metadata
                        .into_iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_string())))
                        .collect();
                }
                continue;
            }
            let shape = entry
                .get("shape")
                .and_then(Value::as_array)
                .and_then(|dims| {
                    dims.iter()
                        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| bad(&format!("tensor {name} has no shape")))?;
            header.shapes.insert(name, shape);
        }
        Ok(header)
    }

    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.shapes.get(key).map(Vec::as_slice)
    }

    pub fn has(&self, key: &str) -> bool {
        self.shapes.contains_key(key)
    }

    pub fn any_under(&self, prefix: &str) -> bool {
        self.shapes
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }
}

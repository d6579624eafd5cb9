//! Key sets and how they are loaded. The hot path only ever calls
//! [`KeyCell::load`]; loaders build a whole new [`KeySet`] and swap it in.

mod keyset;

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;

pub use keyset::{Key, KeySet, KeySetError};

/// The current key set of one provider: `None` until keys first load.
#[derive(Default)]
pub struct KeyCell(ArcSwapOption<KeySet>);

impl KeyCell {
    pub fn load(&self) -> Option<Arc<KeySet>> {
        self.0.load_full()
    }

    pub fn store(&self, keys: KeySet) {
        self.0.store(Some(Arc::new(keys)));
    }
}

/// Upper bound on a JWKS document; a larger one is refused, not parsed.
pub const MAX_JWKS_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge { path: String },
    #[error("{path}: {source}")]
    Invalid { path: String, source: KeySetError },
}

/// Reads and validates a JWKS file; the caller decides whether to publish it.
pub fn read_file(path: &Path) -> Result<KeySet, LoadError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| LoadError::Read {
        path: shown.clone(),
        source,
    })?;
    if meta.len() > MAX_JWKS_BYTES {
        return Err(LoadError::TooLarge { path: shown });
    }
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: shown.clone(),
        source,
    })?;
    KeySet::parse(&bytes).map_err(|source| LoadError::Invalid {
        path: shown,
        source,
    })
}

//! Loading a policy file: read it, parse it (`config`), read what it points to
//! (client secrets, the denylist), compile it (`policy::compile`, pure). The
//! one place that runs both layers; `valet serve`, reloads and the CLI use it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::api_keys::ApiKeys;
use crate::config::{self, ConfigError, Listen, LoadError, Problems, file::FileConfig};
use crate::policy::denylist::DenylistSource;
use crate::policy::{self, Inputs, Policy};
use crate::revocation::Revocation;
use crate::stores::{Snapshot, Stores};

/// A valid policy file, compiled, with what it read besides.
pub struct Loaded {
    pub path: PathBuf,
    pub listen: Listen,
    pub policy: Policy,
    /// The denylist the policy names, as just read.
    pub revocation: Option<Revocation>,
    /// The API key files the providers name, as just read.
    pub api_keys: Vec<ApiKeys>,
    pub warnings: Vec<ConfigError>,
}

impl Loaded {
    /// The policy with stores of its own and no key tasks (keys are published
    /// by the caller): for the CLI, tests and benches.
    pub fn into_snapshot(self) -> Snapshot {
        let stores = Stores::detached(&self.policy, self.revocation).with_api_keys(
            &self.policy,
            self.api_keys,
            None,
        );
        Snapshot::new(self.policy, stores)
    }
}

pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let source = config::read_text(path, config::MAX_CONFIG_BYTES)?;
    parse(&source, path)
}

/// Parses and compiles `source`; `path` names it in errors and anchors relative paths.
pub fn parse(source: &str, path: &Path) -> Result<Loaded, LoadError> {
    let (file, positions) = config::parse_file(source, path)?;
    let mut problems = Problems::new(path, &positions);
    let base = path.parent().unwrap_or(Path::new("."));
    let (inputs, mut revocation, api_keys) = read_inputs(&file, base);
    let (listen, policy) = policy::compile(file, base, &inputs, &mut problems);
    if !problems.errors.is_empty() {
        return Err(LoadError::Invalid(problems.errors));
    }
    // A URL's list is fetched by its task; until then the list is empty and
    // readiness waits for it.
    if let Some(DenylistSource::Uri(remote)) = &policy.revocation {
        revocation = Some(Revocation::remote(remote.clone()));
    }
    Ok(Loaded {
        path: path.to_path_buf(),
        listen,
        policy,
        revocation,
        api_keys,
        warnings: problems.warnings,
    })
}

/// Every file the policy points to besides key sets: client secrets, the
/// denylist, API key files.
fn read_inputs(file: &FileConfig, base: &Path) -> (Inputs, Option<Revocation>, Vec<ApiKeys>) {
    let mut secrets = HashMap::new();
    for p in &file.providers {
        if let Some(i) = &p.introspection {
            let path = base.join(&i.client_secret_file);
            let read = std::fs::read_to_string(&path).map_err(|e| e.to_string());
            secrets.insert(path, read);
        }
    }
    if let Some(f) = file
        .store
        .as_ref()
        .and_then(|s| s.redis.password_file.as_ref())
    {
        let path = base.join(f);
        let read = std::fs::read_to_string(&path).map_err(|e| e.to_string());
        secrets.insert(path, read);
    }
    let (denylist, revocation) = match file.revocation.as_ref().and_then(|r| r.file.as_ref()) {
        None => (None, None),
        Some(f) => match Revocation::load(base.join(f)) {
            Ok(list) => (Some(Ok(())), Some(list)),
            Err(e) => (Some(Err(e)), None),
        },
    };
    let mut api_keys = HashMap::new();
    let mut tables = Vec::new();
    for p in &file.providers {
        if let Some(k) = &p.api_keys {
            let path = base.join(&k.file);
            match ApiKeys::load(path.clone(), p.name.as_str().into(), p.issuer.clone()) {
                Ok(t) => {
                    api_keys.insert(path, Ok(()));
                    tables.push(t);
                }
                Err(e) => {
                    api_keys.insert(path, Err(e));
                }
            }
        }
    }
    (
        Inputs {
            secrets,
            denylist,
            api_keys,
        },
        revocation,
        tables,
    )
}

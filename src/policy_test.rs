//! `valet test`: YAML suites of cases (a request, with claims or a token, and the
//! expected decision) run against a policy, for teams' own CI. Same code as a Check.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::check::Identity;
use crate::decision::Decision;
use crate::explain::RequestSpec;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    /// The policy under test, relative to the suite file (`--config` overrides it).
    pub config: Option<String>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub request: CaseRequest,
    /// Claims taken as verified: the route logic alone.
    pub claims: Option<Map<String, Value>>,
    /// A real token, verified against the provider's keys.
    pub token: Option<String>,
    pub expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    #[serde(default = "get")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    /// The caller's workload identity (`source.principal`), for `require.principals`.
    #[serde(default)]
    pub principal: String,
}

fn get() -> String {
    "GET".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// allow or deny.
    pub decision: String,
    pub reason: Option<String>,
    pub status: Option<u16>,
    /// Headers the upstream must receive (allow only).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

pub fn read_suite(path: &Path) -> Result<Suite, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        format!("{}:{at}: {msg}", path.display())
    })
}

/// Where the suite's policy is: `--config`, else `config:` relative to the suite.
pub fn config_path(
    suite_path: &Path,
    suite: &Suite,
    flag: Option<&Path>,
) -> Result<PathBuf, String> {
    match (flag, &suite.config) {
        (Some(f), _) => Ok(f.to_path_buf()),
        (None, Some(c)) => Ok(suite_path.parent().unwrap_or(Path::new(".")).join(c)),
        (None, None) => Err(format!(
            "{}: no `config:` and no --config",
            suite_path.display()
        )),
    }
}

pub fn needs_keys(suite: &Suite) -> bool {
    suite
        .cases
        .iter()
        .any(|c| c.token.is_some() || c.request.headers.contains_key("authorization"))
}

/// Runs every case; returns (report, passed, failed).
pub fn run(policy: &crate::stores::Snapshot, suite: &Suite, now: u64) -> (String, usize, usize) {
    let mut out = String::new();
    let (mut passed, mut failed) = (0, 0);
    for case in &suite.cases {
        let mut spec = RequestSpec {
            method: case.request.method.clone(),
            path: case.request.path.clone(),
            host: case.request.host.clone(),
            headers: case
                .request
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            context: case.request.context.clone().into_iter().collect(),
            principal: case.request.principal.clone(),
        };
        if let Some(t) = &case.token {
            spec.headers
                .insert("authorization".into(), format!("Bearer {t}"));
        }
        let identity = match &case.claims {
            Some(c) => Identity::Claims(c.clone()),
            None => Identity::Token { now },
        };
        let decision = crate::driver::decide_blocking(policy, &spec.to_check(), identity);
        let problems = compare(&case.expect, &decision);
        if problems.is_empty() {
            passed += 1;
            let _ = writeln!(out, "ok    {}", case.name);
        } else {
            failed += 1;
            let _ = writeln!(out, "FAIL  {}", case.name);
            for p in problems {
                let _ = writeln!(out, "      {p}");
            }
        }
    }
    (out, passed, failed)
}

fn compare(expect: &Expect, got: &Decision) -> Vec<String> {
    let (decision, status, headers) = match got {
        Decision::Allow(a) => (
            "allow",
            200,
            a.headers_set()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        Decision::Deny(d) => ("deny", d.kind.http_status(), Vec::new()),
    };
    let reason = got.reason().label();
    let mut problems = Vec::new();
    if expect.decision != decision {
        problems.push(format!(
            "decision: expected {}, got {decision}",
            expect.decision
        ));
    }
    if let Some(r) = &expect.reason
        && r != reason
    {
        problems.push(format!("reason:   expected {r}, got {reason}"));
    }
    if let Some(s) = expect.status
        && s != status
    {
        problems.push(format!("status:   expected {s}, got {status}"));
    }
    for (k, v) in &expect.headers {
        let k = k.to_ascii_lowercase();
        match headers.iter().find(|(h, _)| *h == k) {
            Some((_, got)) if got == v => {}
            Some((_, got)) => problems.push(format!("header {k}: expected {v:?}, got {got:?}")),
            None => problems.push(format!("header {k}: expected {v:?}, not set")),
        }
    }
    if !problems.is_empty() && !problems.iter().any(|p| p.starts_with("reason")) {
        problems.push(format!("(reason was {reason})"));
    }
    problems
}

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::*;
use crate::decision::{Allow, Decision, Deny, DenyKind};

/// String literals of src/ that look like a metric name but are not one.
const NOT_METRICS: &[&str] = &["valet_route", "valet_routes"];

const CHILD_ENV: &str = "VALET_METRICS_CONTRACT_CHILD";
const BEGIN: &str = "--- rendered metrics ---";
const END: &str = "--- end of rendered metrics ---";

#[test]
fn names_are_unique_and_labels_bounded_or_configured() {
    let mut seen = BTreeSet::new();
    for m in metrics() {
        assert!(seen.insert(m.name), "{} listed twice", m.name);
        assert!(m.name.starts_with("valet_"), "{}", m.name);
        assert!(!m.help.is_empty(), "{} has no help", m.name);
        let mut labels = BTreeSet::new();
        for l in &m.labels {
            assert!(labels.insert(l.name), "{}: label {} twice", m.name, l.name);
            if let Values::Bounded(v) = &l.values {
                assert!(!v.is_empty(), "{}{{{}}}: no values", m.name, l.name);
            }
        }
    }
}

/// Every metric-like string literal in src/ (where telemetry.rs and any other
/// module name their metrics) is in the contract: a metric cannot be added
/// without it.
#[test]
fn every_metric_name_in_the_sources_is_in_the_contract() {
    let listed: BTreeSet<&str> = metrics().iter().map(|m| m.name).collect();
    let mut found = BTreeSet::new();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut dirs = vec![src];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
            let path = entry.expect("src/ entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("a source file");
                for lit in text.split('"').skip(1).step_by(2) {
                    let metric_like = lit.starts_with("valet_")
                        && lit.len() > "valet_".len()
                        && lit
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                    if metric_like && !NOT_METRICS.contains(&lit) {
                        found.insert(lit.to_owned());
                    }
                }
            }
        }
    }
    let missing: Vec<_> = found
        .iter()
        .filter(|n| !listed.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics named in src/ but not in metrics_contract::metrics(): {missing:?}"
    );
    let unused: Vec<_> = listed.iter().filter(|n| !found.contains(**n)).collect();
    assert!(
        unused.is_empty(),
        "in the contract, never named in src/: {unused:?}"
    );
}

/// Installs the real recorder, emits every event telemetry has, and prints what
/// /metrics would serve. Run alone in a child process (below): telemetry keeps
/// handles in statics, registered with whichever recorder was there first.
fn exercise_and_render() -> String {
    let telemetry = t::Telemetry::new();
    telemetry.with(|| exercise(&telemetry));
    telemetry.handle().render()
}

fn exercise(telemetry: &t::Telemetry) {
    let allow = Decision::Allow(Allow {
        route: Some("orders".into()),
        reason: Some(Reason::Verified),
        ..Allow::default()
    });
    let dry_run = Decision::Allow(Allow {
        route: Some("orders".into()),
        reason: Some(Reason::InsufficientScope),
        dry_run: true,
        ..Allow::default()
    });
    let deny = Decision::Deny(Deny::new(
        Reason::MissingToken,
        DenyKind::NoToken,
        "no token",
    ));
    for d in [&allow, &dry_run, &deny] {
        telemetry.check(d, Duration::from_micros(50));
    }
    t::jwks_provider_started("idp");
    t::jwks_loaded("idp", "startup", "success", 2, 1_700_000_000);
    t::jwks_failed("idp", "interval", &"unreachable");
    t::jwks_kids_changed("idp", &["k1"]);
    t::jwks_age("idp", 3);
    for c in t::verify_cache_counters() {
        c.increment(1);
    }
    t::verify_cache_evicted();
    t::verify_cache_entries(1);
    for c in t::signature_counters("idp") {
        c.increment(1);
    }
    t::policy_reloaded("file_change", 2, 3, 1, 1_700_000_000);
    t::policy_reload_failed();
    t::api_keys_loaded("partners", std::path::Path::new("keys.yaml"), 1);
    t::api_keys_failed("partners", std::path::Path::new("keys.yaml"), &"bad line");
    t::revocation_loaded(&"deny.txt", 1);
    t::revocation_failed(&"deny.txt", &"bad line");
    t::revocation_confirmed();
    t::store_up(true);
    t::store_error("spend", "timeout");
    t::store_call("get", Duration::from_millis(1));
    t::store_fallback("dpop");
    t::revocation_staleness(3, false);
    for c in t::introspection_cache_counters("opaque") {
        c.increment(1);
    }
    t::introspection_request("opaque", "active", Some(Duration::from_millis(2)));
    for c in t::introspection_shed_counters("opaque") {
        c.increment(1);
    }
    t::introspection_backoff("opaque");
    t::introspection_circuit("opaque", true);
    t::dpop_replay_full();
    t::dpop_replay_entries(1);
    t::unknown_kid_waiters_full("idp");
    t::connections_open("grpc", 1);
    t::connection_refused("grpc", 1);
    t::connection_closed("grpc", "idle_timeout");
    t::observe_started();
    t::audit_dropped();
    t::trace_spans_dropped("queue_full", 1);
    t::misuse_signal("idp", "token_addresses");
}

#[test]
fn the_recorder_renders_exactly_the_contract() {
    if std::env::var_os(CHILD_ENV).is_some() {
        println!("{BEGIN}\n{}\n{END}", exercise_and_render());
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "metrics_contract::tests::the_recorder_renders_exactly_the_contract",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = stdout
        .split_once(BEGIN)
        .and_then(|(_, rest)| rest.split_once(END))
        .map(|(r, _)| r)
        .expect("the child printed the rendered metrics");
    check_rendered(rendered);
}

#[derive(Default, Debug)]
struct Rendered {
    kind: Option<String>,
    help: Option<String>,
    /// label name -> values seen
    labels: BTreeMap<String, BTreeSet<String>>,
    /// label sets of the series, to see which labels every series has
    series: Vec<BTreeSet<String>>,
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((name.trim_start_matches(',').to_owned(), value));
        rest = &after[end..];
    }
    out
}

fn check_rendered(text: &str) {
    let contract = metrics();
    let by_name: BTreeMap<&str, &Metric> = contract.iter().map(|m| (m.name, m)).collect();
    let base = |series: &str| -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(b) = series.strip_suffix(suffix)
                && by_name.get(b).is_some_and(|m| m.kind == Kind::Histogram)
            {
                return b.to_owned();
            }
        }
        series.to_owned()
    };
    let mut seen: BTreeMap<String, Rendered> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            seen.entry(name.to_owned()).or_default().help = Some(help.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            seen.entry(name.to_owned()).or_default().kind = Some(kind.to_owned());
        } else if !line.starts_with('#') {
            let (series, labels) = match line.split_once('{') {
                Some((name, rest)) => (name, rest.rsplit_once('}').map_or("", |(l, _)| l)),
                None => (line.split_whitespace().next().unwrap_or(line), ""),
            };
            let r = seen.entry(base(series)).or_default();
            let mut names = BTreeSet::new();
            for (k, v) in parse_labels(labels) {
                if k == "le" {
                    continue;
                }
                names.insert(k.clone());
                r.labels.entry(k).or_default().insert(v);
            }
            r.series.push(names);
        }
    }

    let rendered: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    let listed: BTreeSet<&str> = by_name.keys().copied().collect();
    assert_eq!(
        rendered, listed,
        "the recorder renders these metrics, the contract lists those"
    );
    for (name, r) in &seen {
        let m = by_name[name.as_str()];
        assert_eq!(r.kind.as_deref(), Some(m.kind.as_str()), "{name}: type");
        assert_eq!(
            r.help.as_deref(),
            Some(m.help),
            "{name}: the help text of telemetry::describe differs from the contract"
        );
        let allowed: BTreeSet<&str> = m.labels.iter().map(|l| l.name).collect();
        for (label, values) in &r.labels {
            assert!(
                allowed.contains(label.as_str()),
                "{name} carries label {label}, which the contract does not list"
            );
            let l = m.labels.iter().find(|l| l.name == label).expect("listed");
            if let Values::Bounded(ok) = &l.values {
                for v in values {
                    assert!(
                        ok.contains(&v.as_str()),
                        "{name}{{{label}={v:?}}}: not a value the contract lists"
                    );
                }
            }
        }
        for l in m.labels.iter().filter(|l| !l.optional) {
            for series in &r.series {
                assert!(
                    series.contains(l.name),
                    "{name}: a series without the label {}",
                    l.name
                );
            }
        }
    }
}

#[test]
fn json_lists_every_metric_with_its_type_and_labels() {
    let v = to_json();
    let list = v["metrics"].as_array().expect("a list");
    assert_eq!(list.len(), metrics().len());
    let check = list
        .iter()
        .find(|m| m["name"] == t::CHECK_TOTAL)
        .expect("valet_check_total");
    assert_eq!(check["type"], "counter");
    let reason = check["labels"]
        .as_array()
        .expect("labels")
        .iter()
        .find(|l| l["name"] == "reason")
        .expect("reason");
    assert_eq!(
        reason["values"].as_array().map(Vec::len),
        Some(Reason::ALL.len())
    );
}

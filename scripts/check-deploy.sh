#!/usr/bin/env bash
# Validate the deployment files offline: k8s/**/*.yaml and the Dockerfile, with
# the real Kubernetes schemas (PyPI kubernetes-validate), `envoy --mode validate`
# on every Envoy config shipped or generated for Istio, `valet check-config` on
# every policy shipped, and cross-checks between them: scripts/check_deploy.py
# says what is checked. Exits non-zero with a line per problem; the last line of
# stdout is a one-line summary.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/tools.sh
. "$REPO/scripts/lib/tools.sh"
check_tools check-deploy envoy
# K8S_VERSIONS (scripts/lib/venv.sh): the oldest supported and the newest.
exec "$PY" "$REPO/scripts/check_deploy.py" "$REPO" "$ENVOY" "$VALET" \
    "$(command -v kubectl || true)" "$K8S_VERSIONS"

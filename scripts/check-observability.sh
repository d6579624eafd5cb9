#!/usr/bin/env bash
# Validate Valet's Prometheus rules, Grafana dashboard and README metric table
# offline, against the metric contract the code exports (`valet metrics`), and
# unit-test the alerts with promtool: scripts/check_observability.py says what is
# checked. Exits non-zero with a line per problem.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/tools.sh
. "$REPO/scripts/lib/tools.sh"
check_tools check-observability
exec "$PY" "$REPO/scripts/check_observability.py" "$REPO" "$VALET" "$(command -v promtool)"

#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need that is
# not a crate (Envoy, ...), then runs every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

VALET_ENVOY="$(scripts/install-test-deps.sh | tail -n1)"
export VALET_ENVOY

cargo test --locked --all-targets

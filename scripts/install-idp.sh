#!/usr/bin/env bash
# Install the local OpenID provider used by Valet's integration tests:
# panva's `oidc-provider` (npm), pinned in tests/idp/package.json and
# tests/idp/package-lock.json, run with the machine's Node.js.
#
# Idempotent: when node_modules already matches the lock file (and the same
# Node.js major version), it does no network access and returns at once.
#
# The last line of stdout is the absolute path of tests/idp/server.mjs.
# Start it with:  node <that path> [PORT]   (prints `READY <issuer>` on stdout)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IDP="$REPO/tests/idp"
SERVER="$IDP/server.mjs"
STAMP="$IDP/node_modules/.valet-idp-install-stamp"

log() { echo "install-idp: $*" >&2; }

# Keep node_modules out of git (append; never clobber other lines).
GITIGNORE="$REPO/.gitignore"
if [ ! -f "$GITIGNORE" ] || ! grep -qxE '/?tests/idp/node_modules/?' "$GITIGNORE"; then
    if [ -s "$GITIGNORE" ] && [ -n "$(tail -c1 "$GITIGNORE")" ]; then
        echo >>"$GITIGNORE"
    fi
    echo 'tests/idp/node_modules/' >>"$GITIGNORE"
    log "added tests/idp/node_modules/ to $GITIGNORE"
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    # Debian bookworm ships Node.js 18, which oidc-provider 8.x supports.
    log "node/npm not found; installing Debian's nodejs and npm"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
fi

NODE_MAJOR="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$NODE_MAJOR" -lt 18 ]; then
    log "Node.js $(node --version) is too old; oidc-provider 8.x needs >= 18.12"
    exit 1
fi

# Serialize concurrent runs (e.g. several test binaries installing at once).
if command -v flock >/dev/null 2>&1; then
    exec 9<"$IDP/package.json"
    flock 9
fi

want_stamp() {
    {
        echo "node-major=$NODE_MAJOR"
        if [ -f "$IDP/package-lock.json" ]; then
            sha256sum <"$IDP/package-lock.json"
        else
            sha256sum <"$IDP/package.json"
        fi
    } | sha256sum | cut -d' ' -f1
}

WANT="$(want_stamp)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
    && [ -f "$IDP/node_modules/oidc-provider/package.json" ]; then
    :
else
    cd "$IDP"
    # --prefer-offline: what npm's cache holds is used without asking the registry
    # whether it changed (the lock file pins every version and its hash anyway); it
    # halves npm's CPU here. An empty cache still downloads.
    npm_args=(--no-audit --no-fund --loglevel=error --prefer-offline)
    if [ -f package-lock.json ]; then
        log "npm ci in $IDP"
        npm ci "${npm_args[@]}" >&2
    else
        log "npm install in $IDP (no package-lock.json)"
        npm install "${npm_args[@]}" >&2
        WANT="$(want_stamp)"
    fi
    # Smoke check: the package must import under this Node.js.
    node --input-type=module -e "await import('oidc-provider')" >/dev/null 2>&1 || {
        log "oidc-provider does not load with node $(node --version)"
        exit 1
    }
    echo "$WANT" >"$STAMP"
fi

log "oidc-provider $(node -p "require('$IDP/node_modules/oidc-provider/package.json').version") ready (node $(node --version))"
echo "$SERVER"

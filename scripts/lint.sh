#!/usr/bin/env bash
# Lint the tooling (scripts/test.sh runs this): every shell script through
# ShellCheck, and the Python checkers (scripts/*.py) through `ruff check` and
# `ruff format --check` (ruff pinned in .tools/py-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF=.tools/py-venv/bin/ruff
if [ ! -x "$RUFF" ] || ! command -v shellcheck >/dev/null 2>&1; then
    scripts/install-test-deps.sh >/dev/null
fi
"$RUFF" check --quiet scripts
"$RUFF" format --check --quiet scripts
files=(scripts/*.sh scripts/lib/*.sh .ci/run tests/fixtures/*.sh)
# ShellCheck takes seconds and its verdict depends only on these: a stamp of their
# contents (and its version and rc file) skips it when nothing changed since a pass.
stamp=.tools/shellcheck.passed
sum="$({ shellcheck --version; cat .shellcheckrc; sha256sum "${files[@]}"; } | sha256sum)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
    rm -f "$stamp"
    # The longest script takes half the time: it gets a process of its own.
    slow=scripts/bench-envoy.sh
    shellcheck "$slow" &
    pid=$!
    rest=()
    for f in "${files[@]}"; do
        [ "$f" = "$slow" ] || rest+=("$f")
    done
    shellcheck "${rest[@]}"
    wait "$pid"
    echo "$sum" >"$stamp"
fi
echo "lint: ruff and shellcheck OK"

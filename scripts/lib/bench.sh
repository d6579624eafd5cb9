# shellcheck shell=bash disable=SC2154,SC2034  # die, work, pids, bin come from the caller; PID, ADDR, ADMIN go back to it
# Sourced by scripts/bench.sh and scripts/bench-envoy.sh: what both need to run
# Valet on the shipped policy. Expects of the caller: `die`, `$work` (a temporary
# directory), the array `pids` (killed on exit) and `$bin` (where valet is).

# shipped_configs DIR: writes DIR/valet.yaml (config/valet.yaml on free ports, its
# files by absolute path) and DIR/valet-nocache.yaml (the same with the
# verified-token cache off), both checked by `valet check-config`. DIR holds
# nothing else: Valet watches its policy's directory and wakes on every write
# there (h2load's log lines would cost Valet CPU in every scenario).
shipped_configs() {
    local dir=$1
    mkdir -p "$dir"
    sed -E \
        -e 's#^(  grpc:[[:space:]]*)[^[:space:]]+#\1127.0.0.1:0#' \
        -e 's#^(  admin:[[:space:]]*)[^[:space:]]+#\1127.0.0.1:0#' \
        -e "s#^([[:space:]]+file:[[:space:]]*)([^/[:space:]][^[:space:]]*)#\\1$PWD/config/\\2#" \
        config/valet.yaml >"$dir/valet.yaml"
    grep -q '^  grpc: 127.0.0.1:0' "$dir/valet.yaml" || die "could not rewrite listen.grpc"
    grep -q "file: $PWD/config/" "$dir/valet.yaml" || die "could not rewrite the relative file: paths"
    if grep -q '^cache:' "$dir/valet.yaml"; then
        die "config/valet.yaml already has a top-level cache: block"
    fi
    { cat "$dir/valet.yaml"; printf '\ncache: { max_entries: 0 }\n'; } >"$dir/valet-nocache.yaml"
    "$bin/valet" check-config --config "$dir/valet.yaml" >/dev/null
    "$bin/valet" check-config --config "$dir/valet-nocache.yaml" >/dev/null
}

# start_server NAME CPU ARGS...: runs a gRPC server (valet, noop_authz) pinned to
# CPU and waits for its "grpc=ADDR" log line; sets PID, ADDR and ADMIN (if logged).
start_server() {
    local name=$1 cpu=$2 log="$work/$1.log"
    shift 2
    taskset -c "$cpu" "$@" >/dev/null 2>"$log" &
    PID=$!
    pids+=("$PID")
    ADDR='' ADMIN=''
    for _ in $(seq 200); do
        ADDR=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -o 'grpc=[0-9.]*:[0-9]*' | head -n1 | cut -d= -f2 || true)
        [[ -n $ADDR ]] && break
        kill -0 "$PID" 2>/dev/null || die "$name exited: $(cat "$log")"
        sleep 0.05
    done
    [[ -n $ADDR ]] || die "$name did not start: $(cat "$log")"
    [[ $ADDR == 127.0.0.1:* ]] || die "$name listens on $ADDR, not 127.0.0.1"
    ADMIN=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -o 'admin=[0-9.]*:[0-9]*' | head -n1 | cut -d= -f2 || true)
}

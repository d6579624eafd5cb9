#!/usr/bin/env bash
# What tracing costs a Check: three Valets on the shipped policy, served on one
# core and loaded by h2load from the other, in interleaved rounds:
#   off   no `tracing:` (no tracer, no span)
#   s0    tracing on, sample_ratio 0, and the request's traceparent (the one
#         examples/check_body writes, as Envoy sends it) says "not sampled": the
#         tracer runs, no span is recorded
#   s1    tracing on, sample_ratio 1, traceparent sampled: every Check's span is
#         recorded and exported to a real OTLP receiver (examples/otlp_sink)
# Reported per scenario: median req/s and server CPU µs per Check
# (/proc/PID/stat), and the ratio of each to `off` within the same run.
#
#   scripts/bench-tracing.sh                 # 3 rounds of 4 s
#   ROUNDS=1 DURATION=3 NO_BUILD=1 scripts/bench-tracing.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-4}
CLIENTS=${CLIENTS:-16}
STREAMS=${STREAMS:-16}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
CHECK_PATH=/envoy.service.auth.v3.Authorization/Check

die() { echo "bench-tracing: $*" >&2; exit 1; }
command -v h2load >/dev/null || die "h2load is missing (apt-get install nghttp2-client)"
[[ ${NO_BUILD:-0} == 1 ]] || cargo build --release --examples --bins

work=$(mktemp -d)
pids=()
cleanup() {
    local rc=$? pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

bin=target/release
"$bin/examples/check_body" --out "$work/allow.bin"
# The same request with its traceparent's flags 00 (same length: the protobuf holds).
python3 - "$work/allow.bin" "$work/unsampled.bin" <<'PY'
import sys
body = open(sys.argv[1], "rb").read()
sampled = b"-00f067aa0ba902b7-01"
assert body.count(sampled) == 1, "check_body's traceparent changed"
open(sys.argv[2], "wb").write(body.replace(sampled, b"-00f067aa0ba902b7-00"))
PY
# shellcheck source=scripts/lib/bench.sh
. scripts/lib/bench.sh
shipped_configs "$work/policy"

sink_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
taskset -c "$LOAD_CPU" "$bin/examples/otlp_sink" --addr "127.0.0.1:$sink_port" 2>"$work/sink.log" &
pids+=($!)
for ratio in 0 1; do
    mkdir -p "$work/s$ratio"
    { cat "$work/policy/valet.yaml"
      printf '\ntracing:\n  sample_ratio: %s\n  otlp: { endpoint: "http://127.0.0.1:%s" }\n' "$ratio" "$sink_port"
    } >"$work/s$ratio/valet.yaml"
    "$bin/valet" check-config --config "$work/s$ratio/valet.yaml" >/dev/null
done

declare -A addr_of pid_of body_of=([off]=$work/allow.bin [s0]=$work/unsampled.bin [s1]=$work/allow.bin)
for s in off s0 s1; do
    config="$work/$s/valet.yaml"
    [[ $s == off ]] && config="$work/policy/valet.yaml"
    start_server "$s" "$SERVER_CPU" "$bin/valet" serve --config "$config"
    addr_of[$s]=$ADDR pid_of[$s]=$PID
    for _ in $(seq 100); do curl -fs "http://$ADMIN/readyz" >/dev/null && break; sleep 0.05; done
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk_tck=$(getconf CLK_TCK)
run() {
    local s=$1 seconds=$2 tag=$3 out="$work/h2load-$1-$3.txt" c0 c1 rps ok
    c0=$(cpu_ticks "${pid_of[$s]}")
    taskset -c "$LOAD_CPU" h2load -D "$seconds" -c "$CLIENTS" -m "$STREAMS" \
        -H 'content-type: application/grpc' -H 'te: trailers' -d "${body_of[$s]}" \
        "http://${addr_of[$s]}$CHECK_PATH" >"$out" 2>&1 || die "h2load failed: $(tail -n5 "$out")"
    c1=$(cpu_ticks "${pid_of[$s]}")
    rps=$(sed -nE 's/^finished in [^,]*, ([0-9.]+) req\/s.*/\1/p' "$out")
    ok=$(sed -nE 's/^requests: .* ([0-9]+) succeeded.*/\1/p' "$out")
    (( ok > 0 )) || die "$s: no request succeeded"
    awk -v s="$s" -v r="$rps" -v d=$((c1 - c0)) -v hz="$clk_tck" -v n="$ok" \
        'BEGIN {printf "%s %s %.2f\n", s, r, d * 1e6 / hz / n}' >>"$work/$tag"
}
for s in off s0 s1; do run "$s" 1 warmup; done
for r in $(seq "$ROUNDS"); do
    echo "round $r/$ROUNDS"
    for s in off s0 s1; do run "$s" "$DURATION" results; done
done
echo "median over $ROUNDS round(s) of ${DURATION}s; h2load -c $CLIENTS -m $STREAMS, server on CPU $SERVER_CPU"
printf '%-5s %10s %14s %9s %9s\n' scenario req/s "CPU µs/Check" "rps/off" "cpu/off"
median() { sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
off_rps=$(awk '$1=="off" {print $2}' "$work/results" | median)
off_cpu=$(awk '$1=="off" {print $3}' "$work/results" | median)
for s in off s0 s1; do
    rps=$(awk -v s="$s" '$1==s {print $2}' "$work/results" | median)
    cpu=$(awk -v s="$s" '$1==s {print $3}' "$work/results" | median)
    awk -v s="$s" -v r="$rps" -v c="$cpu" -v r0="$off_rps" -v c0="$off_cpu" \
        'BEGIN {printf "%-8s %10.0f %14.2f %9.2f %9.2f\n", s, r, c, r / r0, c / c0}'
done
echo "spans the receiver got: $(tail -n1 "$work/sink.log")"

#!/usr/bin/env bash
# End-to-end throughput of Valet against a no-op ext_authz server (the floor),
# both served on one core and loaded by h2load from the other, on 127.0.0.1 only.
#
#   scripts/bench.sh                     # 5 interleaved rounds of 4 s, ~2 minutes once built
#   ROUNDS=3 DURATION=3 scripts/bench.sh
#   BASELINE=/tmp/valet-old scripts/bench.sh   # A/B: also valet-allow on another binary
#   NO_BUILD=1 BASELINE=... scripts/bench.sh    # the binaries in target/release as they are
#
# Scenarios, each run once per round in this order so drift hits all alike:
#   noop           examples/noop_authz: answers OK without reading the request
#   valet-allow    GET /orders/7 with an RS256 token, allowed by config/valet.yaml;
#                  one token, so every Check after the first hits the verified-token cache
#   valet-missing  the same request without a token: denied (401), logged at info
#   valet-nocache  valet-allow against a second Valet with `cache: { max_entries: 0 }`:
#                  every Check verifies the RS256 signature
#   baseline-allow, baseline-nocache (with BASELINE=BINARY) valet-allow and
#                  valet-nocache against that binary (e.g. the release build before a
#                  change), same configs, same core: the change's cost as a ratio
#                  measured in the same run
# Reported: median req/s over rounds, the median of per-round ratios to noop,
# median p50/p99 latency (h2load --log-file), server CPU µs per Check
# (/proc/PID/stat utime+stime), and Valet's RSS idle and after the load.
# Then the budgets (issue 15), each a ratio within this run:
#   cached Check      valet-allow req/s >= 0.8x noop's, CPU/Check <= 1.25x noop's
#   uncached RS256    valet-nocache CPU/Check <= noop's + 1.2x a bare RS256 verify
#                     (examples/verify_rs256 on the server's core, once per round)
#   idle RSS          <= 12 MiB
# BUDGETS_STRICT=1 makes a missed budget fail the script.
# h2load counts any HTTP 200 as success, so one response per body is decoded
# first, and Valet's own counters are compared with h2load's afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-4}     # seconds of load per run
CLIENTS=${CLIENTS:-16}      # h2load -c
STREAMS=${STREAMS:-16}      # h2load -m, streams per connection
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
CHECK_PATH=/envoy.service.auth.v3.Authorization/Check

die() { echo "bench: $*" >&2; exit 1; }

if ! command -v h2load >/dev/null || ! command -v nghttp >/dev/null; then
    echo "bench: installing nghttp2-client (h2load, nghttp)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
fi
command -v taskset >/dev/null || die "taskset (util-linux) is missing"
command -v curl >/dev/null || die "curl is missing"

# NO_BUILD=1: bench the binaries in target/release as they are (e.g. a build with
# --features mimalloc, against BASELINE=the default build).
[[ ${NO_BUILD:-0} == 1 ]] || cargo build --release --examples --bins

work=$(mktemp -d)
pids=()
cleanup() {
    local rc=$?
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bin=target/release
"$bin/examples/check_body" --out "$work/allow.bin"
"$bin/examples/check_body" --out "$work/missing.bin" --no-token

# shellcheck source=scripts/lib/bench.sh
. scripts/lib/bench.sh
shipped_configs "$work/policy"
config="$work/policy/valet.yaml"
nocache="$work/policy/valet-nocache.yaml"
start() { local name=$1; shift; start_server "$name" "$SERVER_CPU" "$@"; }

start noop "$bin/examples/noop_authz" --addr 127.0.0.1:0
NOOP_PID=$PID NOOP_ADDR=$ADDR
start valet "$bin/valet" serve --config "$config"
VALET_PID=$PID VALET_ADDR=$ADDR VALET_ADMIN=$ADMIN
start valet-nocache "$bin/valet" serve --config "$nocache"
NOCACHE_PID=$PID NOCACHE_ADDR=$ADDR NOCACHE_ADMIN=$ADMIN
admins=("$VALET_ADMIN" "$NOCACHE_ADMIN")
if [[ -n ${BASELINE:-} ]]; then
    [[ -x $BASELINE ]] || die "BASELINE=$BASELINE is not an executable"
    start baseline "$BASELINE" serve --config "$config"
    BASE_PID=$PID BASE_ADDR=$ADDR BASE_ADMIN=$ADMIN
    start baseline-nocache "$BASELINE" serve --config "$nocache"
    BASENC_PID=$PID BASENC_ADDR=$ADDR BASENC_ADMIN=$ADMIN
    admins+=("$BASE_ADMIN" "$BASENC_ADMIN")
fi
for admin in "${admins[@]}"; do
    [[ -n $admin ]] || die "valet logged no admin address"
    for _ in $(seq 100); do
        curl -fs "http://$admin/readyz" >/dev/null && break
        sleep 0.05
    done
    curl -fs "http://$admin/readyz" >/dev/null || die "valet on $admin is not ready"
done

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
clk_tck=$(getconf CLK_TCK)

# verify ADDR BODY WANT: one Check with BODY must end with grpc-status 0 and
# hold a CheckResponse whose decision starts with WANT (ALLOW or DENY).
verify() {
    local addr=$1 body=$2 want=$3 url="http://$1$CHECK_PATH"
    nghttp -v -H 'content-type: application/grpc' -H 'te: trailers' -d "$body" "$url" \
        >"$work/verify.txt" 2>&1 || die "nghttp to $addr failed: $(tail -n5 "$work/verify.txt")"
    grep -aq ':status: 200' "$work/verify.txt" || die "$addr: no HTTP 200"
    grep -aq 'grpc-status: 0' "$work/verify.txt" || die "$addr: no grpc-status 0 trailer"
    nghttp -H 'content-type: application/grpc' -H 'te: trailers' -d "$body" "$url" \
        >"$work/response.bin" || die "nghttp to $addr failed"
    local got
    got=$("$bin/examples/check_body" --decode-response "$work/response.bin")
    [[ $got == "$want"* ]] || die "$addr with $(basename "$body"): want $want, got: $got"
    printf '  %-22s %-12s grpc-status 0, %s\n' "$addr" "$(basename "$body")" "${got:0:150}"
}

echo "verifying one response per scenario:"
verify "$NOOP_ADDR" "$work/allow.bin" ALLOW
verify "$VALET_ADDR" "$work/allow.bin" ALLOW
verify "$VALET_ADDR" "$work/missing.bin" DENY
verify "$NOCACHE_ADDR" "$work/allow.bin" ALLOW
if [[ -n ${BASELINE:-} ]]; then
    verify "$BASE_ADDR" "$work/allow.bin" ALLOW
    verify "$BASENC_ADDR" "$work/allow.bin" ALLOW
fi
rss_idle=$(rss_kib "$VALET_PID")
nocache_rss_idle=$(rss_kib "$NOCACHE_PID")

# load SCENARIO ADDR PID BODY SECONDS TAG: one h2load run; appends a line
# "scenario tag rps succeeded p50 p99 cpu_us_per_check" to $work/results.
load() {
    local scenario=$1 addr=$2 pid=$3 body=$4 seconds=$5 tag=$6
    local out="$work/h2load-$scenario-$tag.txt" log="$work/h2load-$scenario-$tag.log"
    local c0 c1
    c0=$(cpu_ticks "$pid")
    taskset -c "$LOAD_CPU" h2load -D "$seconds" -c "$CLIENTS" -m "$STREAMS" \
        -H 'content-type: application/grpc' -H 'te: trailers' -d "$body" \
        --log-file "$log" "http://$addr$CHECK_PATH" >"$out" 2>&1 ||
        die "h2load failed: $(tail -n5 "$out")"
    c1=$(cpu_ticks "$pid")
    local rps ok bad
    rps=$(sed -nE 's/^finished in [^,]*, ([0-9.]+) req\/s.*/\1/p' "$out")
    ok=$(sed -nE 's/^requests: .* ([0-9]+) succeeded.*/\1/p' "$out")
    bad=$(sed -nE 's/^requests: .* ([0-9]+) failed, ([0-9]+) errored, ([0-9]+) timeout.*/\1+\2+\3/p' "$out")
    [[ -n $rps && -n $ok ]] || die "cannot read h2load output: $(cat "$out")"
    (( ok > 0 )) || die "$scenario: no request succeeded: $(cat "$out")"
    (( bad == 0 )) || die "$scenario: failed/errored/timeout requests ($bad): $(grep -E '^(requests|status codes):' "$out")"
    awk -F'\t' '$2 != 200 {bad++} END {exit bad > 0}' "$log" || die "$scenario: non-200 in $log"
    local lat
    lat=$(cut -f3 "$log" | sort -n | awk '{v[NR] = $1} END {
        i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
        i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
        print v[i50], v[i99]}')
    local cpu
    cpu=$(awk -v d=$((c1 - c0)) -v hz="$clk_tck" -v n="$ok" 'BEGIN {printf "%.1f", d * 1e6 / hz / n}')
    echo "$scenario $tag $rps $ok $lat $cpu" >>"$work/results"
    rm -f "$log"
}

declare -A addr_of=([noop]=$NOOP_ADDR [valet-allow]=$VALET_ADDR [valet-missing]=$VALET_ADDR
    [valet-nocache]=$NOCACHE_ADDR)
declare -A pid_of=([noop]=$NOOP_PID [valet-allow]=$VALET_PID [valet-missing]=$VALET_PID
    [valet-nocache]=$NOCACHE_PID)
declare -A body_of=([noop]=$work/allow.bin [valet-allow]=$work/allow.bin
    [valet-missing]=$work/missing.bin [valet-nocache]=$work/allow.bin)
scenarios=(noop valet-allow valet-missing valet-nocache)
if [[ -n ${BASELINE:-} ]]; then
    addr_of[baseline-allow]=$BASE_ADDR pid_of[baseline-allow]=$BASE_PID
    body_of[baseline-allow]=$work/allow.bin
    addr_of[baseline-nocache]=$BASENC_ADDR pid_of[baseline-nocache]=$BASENC_PID
    body_of[baseline-nocache]=$work/allow.bin
    scenarios+=(baseline-allow baseline-nocache)
fi

echo "warming up (1 s each, discarded)"
for s in "${scenarios[@]}"; do
    load "$s" "${addr_of[$s]}" "${pid_of[$s]}" "${body_of[$s]}" 1 warmup
done
for r in $(seq "$ROUNDS"); do
    echo "round $r/$ROUNDS"
    for s in "${scenarios[@]}"; do
        load "$s" "${addr_of[$s]}" "${pid_of[$s]}" "${body_of[$s]}" "$DURATION" "r$r"
    done
    taskset -c "$SERVER_CPU" "$bin/examples/verify_rs256" --loops 1000 |
        awk -v r="r$r" '{print r, $2}' >>"$work/verify"
done
rss_loaded=$(rss_kib "$VALET_PID")
nocache_rss_loaded=$(rss_kib "$NOCACHE_PID")

# Valet's own count must cover every 200 h2load saw (a 200 is not an allow).
metric() {
    curl -fs "http://$1/metrics" |
        awk -v want="$2" 'index($0, "valet_check_total{") == 1 && index($0, want) {s += $NF} END {printf "%d", s}'
}
# compare SCENARIO ADMIN REASON: fails unless Valet counted at least as many
# Checks with REASON as h2load saw 200s in SCENARIO (warm-up included).
compare() {
    local server client
    server=$(metric "$2" "reason=\"$3\"")
    client=$(awk -v s="$1" '$1 == s {n += $4} END {printf "%d", n}' "$work/results")
    printf '  %-14s %-14s valet %9d   h2load %9d\n' "$1" "$3" "$server" "$client"
    (( server >= client )) || die "$1: Valet counted fewer '$3' Checks than h2load saw 200s"
}
echo
echo "server-side counts (valet_check_total by reason) vs h2load 2xx:"
compare valet-allow "$VALET_ADMIN" verified
compare valet-missing "$VALET_ADMIN" missing_token
compare valet-nocache "$NOCACHE_ADMIN" verified
if [[ -n ${BASELINE:-} ]]; then
    compare baseline-allow "$BASE_ADMIN" verified
    compare baseline-nocache "$BASENC_ADMIN" verified
fi

median() { sort -g | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
col() { awk -v s="$1" -v c="$2" '$1 == s && $2 != "warmup" {print $c}' "$work/results"; }

echo
echo "h2load -c $CLIENTS -m $STREAMS, ${DURATION}s per run, $ROUNDS interleaved rounds; server on cpu $SERVER_CPU, h2load on cpu $LOAD_CPU"
printf '%-14s %12s %10s %10s %10s %14s\n' scenario "req/s" "vs noop" "p50 µs" "p99 µs" "CPU µs/Check"
for s in "${scenarios[@]}"; do
    ratio=$(awk -v s="$s" '$2 != "warmup" {rps[$1 " " $2] = $3; tags[$2]}
        END {for (t in tags) if (rps["noop " t] > 0) printf "%.3f\n", rps[s " " t] / rps["noop " t]}' \
        "$work/results" | median)
    printf '%-14s %12.0f %10.2f %10.0f %10.0f %14.1f\n' "$s" \
        "$(col "$s" 3 | median)" "$ratio" "$(col "$s" 5 | median)" "$(col "$s" 6 | median)" "$(col "$s" 7 | median)"
done
echo
echo "per run (scenario round req/s succeeded p50 p99 cpu_us):"
grep -v ' warmup ' "$work/results" | sed 's/^/  /'
echo
echo "valet RSS (VmRSS): idle ${rss_idle} KiB, after load ${rss_loaded} KiB;" \
    "cache off: idle ${nocache_rss_idle} KiB, after load ${nocache_rss_loaded} KiB"

# budget NAME VALUE OP LIMIT: one line, holds or misses (and by how much).
missed=0
budget() {
    local name=$1 value=$2 op=$3 limit=$4 ok
    ok=$(awk -v v="$value" -v l="$limit" -v op="$op" 'BEGIN {print (op == ">=" ? v >= l : v <= l)}')
    if (( ok )); then
        printf '  %-44s %10s %s %-10s holds\n' "$name" "$value" "$op" "$limit"
    else
        printf '  %-44s %10s %s %-10s MISSED by %s%%\n' "$name" "$value" "$op" "$limit" \
            "$(awk -v v="$value" -v l="$limit" 'BEGIN {printf "%.0f", (v > l ? v / l - 1 : 1 - v / l) * 100}')"
        missed=1
    fi
}
# per_round A B COL: the median over rounds of A's COL divided by B's.
per_round() {
    awk -v a="$1" -v b="$2" -v c="$3" '$2 != "warmup" {v[$1 " " $2] = $c; tags[$2]}
        END {for (t in tags) if (v[b " " t] > 0) printf "%.3f\n", v[a " " t] / v[b " " t]}' \
        "$work/results" | median
}
verify_us=$(awk '{print $2}' "$work/verify" | median)
noop_cpu=$(col noop 7 | median)
nocache_cpu=$(col valet-nocache 7 | median)
echo
echo "budgets (bare RS256 verify on cpu $SERVER_CPU: ${verify_us} µs, median of rounds):"
budget "cached Check throughput / noop" "$(per_round valet-allow noop 3)" ">=" 0.8
budget "cached Check CPU/Check / noop" "$(per_round valet-allow noop 7)" "<=" 1.25
budget "uncached RS256 CPU/Check µs (noop + 1.2 verify)" "$nocache_cpu" "<=" \
    "$(awk -v n="$noop_cpu" -v v="$verify_us" 'BEGIN {printf "%.1f", n + 1.2 * v}')"
budget "idle RSS MiB" "$(awk -v k="$rss_idle" 'BEGIN {printf "%.1f", k / 1024}')" "<=" 12
if [[ -n ${BASELINE:-} ]]; then
    echo "A/B against $BASELINE (median of per-round ratios, this build / baseline):"
    printf '  %-44s %10s\n' "cached req/s" "$(per_round valet-allow baseline-allow 3)" \
        "cached CPU/Check" "$(per_round valet-allow baseline-allow 7)" \
        "uncached req/s" "$(per_round valet-nocache baseline-nocache 3)" \
        "uncached CPU/Check" "$(per_round valet-nocache baseline-nocache 7)"
fi
if [[ ${BUDGETS_STRICT:-0} == 1 ]] && (( missed )); then
    die "a budget was missed"
fi

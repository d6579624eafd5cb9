#!/usr/bin/env bash
# A deterministic profile of Valet's Checks by module: valgrind --tool=callgrind on
# a release binary, counting instructions only while h2load sends N cached-token
# Checks (startup excluded), then self cost summed by crate (valet by module).
#
#   scripts/profile.sh [BINARY] [N]     # default target/release/valet, 3000 Checks
#   KEEP=FILE scripts/profile.sh ...     # also keep callgrind's output
#   scripts/profile.sh --summarize FILE N
#
# Instruction counts, not time: kernel and cache misses are not in them, but two
# builds compare exactly, which a machine shared with other work cannot give.
set -euo pipefail
cd "$(dirname "$0")/.."
valet=${1:-target/release/valet}
n=${2:-3000}
die() { echo "profile: $*" >&2; exit 1; }
# summarize CALLGRIND_OUT N: self instructions per Check, summed by module.
summarize() {
    callgrind_annotate --threshold=100 --inclusive=no "$1" 2>/dev/null |
        awk -v n="$2" '
        /^ *[0-9,]+ +\(/ || /^ *[0-9,]+  / {
            ir = $1; gsub(",", "", ir); if (ir !~ /^[0-9]+$/) next
            if ($0 ~ /PROGRAM TOTALS/) next
            line = $0; sub(/^ *[0-9,]+ +(\([^)]*\) +)?/, "", line); sub(/ \[[^]]*\]$/, "", line)
            fn = line; sub(/^[^:]*:/, "", fn)
            if (fn ~ /memmove|memcpy|memset|memcmp|^str/) mod = "libc copy"
            else if (fn ~ /malloc|free|realloc|calloc|^_int_|tcache|unlink_chunk|_mid_memalign|^mi_|^_mi_/) mod = "allocator"
            else if (fn ~ /aws_lc|^EVP_|^RSA_|^BN_|^bn_/) mod = "aws-lc (sha256, rsa)"
            else if (fn !~ /::/) mod = "other (libc, kernel calls)"
            else {
                f = fn; gsub(/^[<&*( ]+/, "", f); gsub(/^(dyn |impl |mut )+/, "", f)
                split(f, seg, "::")
                mod = seg[1]; sub(/ as .*/, "", mod)
                if (mod == "valet" && seg[2] != "") { m2 = seg[2]; sub(/[ >].*/, "", m2); mod = "valet::" m2 }
                if (mod == "core" || mod == "alloc" || mod == "std") mod = "std (" mod ")"
            }
            total += ir; by[mod] += ir
        }
        END {
            printf "%-28s %10s %7s\n", "module", "Ir/Check", "share"
            for (m in by) if (by[m] / n >= 1) printf "%d\t%-28s %10.0f %6.1f%%\n", by[m], m, by[m] / n, 100 * by[m] / total | "sort -nr | cut -f2"
        close("sort -nr | cut -f2")
        printf "%-28s %10.0f\n", "total", total / n
        }'
}
if [[ ${1:-} == --summarize ]]; then summarize "$2" "$3"; exit; fi

command -v valgrind >/dev/null || die "valgrind is missing"
command -v h2load >/dev/null || die "h2load is missing (scripts/bench.sh installs it)"
check_body=target/release/examples/check_body
if [[ ! -x $check_body ]]; then
    check_body=target/debug/examples/check_body
    [[ -x $check_body ]] || cargo build --example check_body
fi

work=$(mktemp -d)
# shipped_configs runs "$bin/valet": the binary under test.
bin=$work/bin
mkdir -p "$bin"
ln -s "$(realpath "$valet")" "$bin/valet"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# shellcheck source=scripts/lib/bench.sh
. scripts/lib/bench.sh
shipped_configs "$work/policy"
"$check_body" --out "$work/allow.bin"

valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/cg.out" \
    "$valet" serve --config "$work/policy/valet.yaml" >/dev/null 2>"$work/valet.log" &
pid=$!
pids+=("$pid")
addr=''
for _ in $(seq 600); do
    addr=$(sed 's/\x1b\[[0-9;]*m//g' "$work/valet.log" | grep -o 'grpc=[0-9.]*:[0-9]*' | head -n1 | cut -d= -f2 || true)
    [[ -n $addr ]] && break
    sleep 0.1
done
[[ -n $addr ]] || die "valet did not start: $(tail -n5 "$work/valet.log")"
path=/envoy.service.auth.v3.Authorization/Check
h2() { h2load -n "$1" -c 4 -m 16 -H 'content-type: application/grpc' -H 'te: trailers' \
    -d "$work/allow.bin" "http://$addr$path" >"$work/h2load.txt" 2>&1 || die "h2load: $(tail -n3 "$work/h2load.txt")"; }
h2 200   # warm: keys loaded, token cached, connections' buffers grown
callgrind_control -i on "$pid" >/dev/null
h2 "$n"
callgrind_control -i off "$pid" >/dev/null
grep -E '^requests:' "$work/h2load.txt"
kill -INT "$pid"
wait "$pid" 2>/dev/null || true
[[ -n ${KEEP:-} ]] && cp "$work/cg.out" "$KEEP"
summarize "$work/cg.out" "$n"

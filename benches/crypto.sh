#!/usr/bin/env bash
# What encryption costs: initial import (laybak attach / restic backup) and
# restore (into tmpfs, so CPU is measured, not the disk) of the same trees,
# laybak encrypted, laybak plaintext (init --no-encryption) and restic
# (which always encrypts), side by side in one run. Median of REPS, wall
# seconds; the repository sizes show the padding's cost.
#
#   benches/crypto.sh [--files N] [--large MIB] [--reps R] [--out FILE]
#     --files N    files in the small, source-tree-like set (default 10000)
#     --large MIB  total size of the four-big-files set (default 1024)
#     --reps R     repetitions of each measurement (default 3)
#     --out FILE   also write the markdown table to FILE
#     --smoke      tiny trees, one rep (CI)
# Run as root (laybak mounts overlayfs); needs restic and python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FILES=10000 LARGE=1024 REPS=3 OUT=""
while [ $# -gt 0 ]; do
    case $1 in
        --files) FILES=$2; shift 2 ;;
        --large) LARGE=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --smoke) FILES=300 LARGE=8 REPS=1; shift ;;
        *) echo "crypto.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "crypto.sh: run as root" >&2; exit 1; }
command -v restic >/dev/null || { echo "crypto.sh: apt-get install restic" >&2; exit 1; }
cargo build --release --quiet
L=$PWD/target/release/laybak
GEN=$PWD/benches/gen_tree.py
W=$(mktemp -d /var/tmp/laybak-crypto.XXXXXX)
T=$W/tmpfs
mkdir -p "$T"
mount -t tmpfs -o size=75% tmpfs "$T"
cleanup() {
    "$L" detach "$W/vol" --state-dir "$W/state" >/dev/null 2>&1 || true
    umount "$T" 2>/dev/null || true
    rm -rf --one-file-system "$W"
}
trap cleanup EXIT
export RESTIC_PASSWORD=bench LAYBAK_PASSWORD=bench RESTIC_CACHE_DIR=$W/restic-cache
now() { date +%s.%N; }
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
size() { du -sb "$1" | cut -f1; }

rows=()
run_set() { # NAME GEN-ARGS...
    local set=$1; shift
    rm -rf "$W/src"; mkdir -p "$W/src"
    python3 "$GEN" "$@" >/dev/null
    local desc; desc=$(python3 "$GEN" summary "$W/src")
    for tool in laybak-encrypted laybak-plaintext restic; do
        local ini=() res=() opn=() repo_size=0
        for _ in $(seq "$REPS"); do
            rm -rf "$W/repo" "$W/state" "$W/vol" "$W/restic-cache"
            cp -a "$W/src" "$W/vol"
            sync
            local t0 t1
            case $tool in
                laybak-*)
                    local flag=""; [ $tool = laybak-plaintext ] && flag=--no-encryption
                    "$L" init --repo "$W/repo" $flag 2>/dev/null
                    t0=$(now)
                    "$L" attach "$W/vol" --repo "$W/repo" --state-dir "$W/state" >/dev/null
                    t1=$(now)
                    ;;
                restic)
                    restic -r "$W/repo" init >/dev/null 2>&1
                    t0=$(now)
                    (cd "$W/vol" && restic -r "$W/repo" backup --host bench . >/dev/null)
                    t1=$(now)
                    ;;
            esac
            ini+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
            repo_size=$(size "$W/repo")
            # What opening the repository costs (the key derivation).
            t0=$(now)
            case $tool in
                laybak-*) "$L" snapshots --repo "$W/repo" --state-dir "$W/state" >/dev/null ;;
                restic) restic -r "$W/repo" cat config >/dev/null ;;
            esac
            t1=$(now)
            opn+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
            rm -rf "$T/r"
            t0=$(now)
            case $tool in
                laybak-*) "$L" restore latest "$T/r" --repo "$W/repo" --state-dir "$W/state" >/dev/null ;;
                restic) restic -r "$W/repo" restore latest --target "$T/r" >/dev/null ;;
            esac
            t1=$(now)
            res+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
            rm -rf "$T/r"
            case $tool in
                laybak-*) "$L" detach "$W/vol" --repo "$W/repo" --state-dir "$W/state" >/dev/null ;;
            esac
        done
        local mi mr mo
        mi=$(printf '%s\n' "${ini[@]}" | median)
        mr=$(printf '%s\n' "${res[@]}" | median)
        mo=$(printf '%s\n' "${opn[@]}" | median)
        rows+=("$set|$desc|$tool|$mi|$mr|$repo_size|$mo")
        echo "$set $tool: initial ${mi}s restore ${mr}s repo ${repo_size}B (${ini[*]} / ${res[*]})"
    done
}

run_set "small-$FILES" small "$W/src" "$FILES" crypto
run_set "large-${LARGE}MiB" large "$W/src" $((LARGE << 20)) crypto

table=$(
    echo "| set | files, bytes | tool | initial (s) | restore to tmpfs (s) | repository (bytes) | open (s) | vs plaintext laybak (initial / restore / size) | less the open (initial / restore) |"
    echo "|---|---|---|---:|---:|---:|---:|---|---|"
    for r in "${rows[@]}"; do
        IFS='|' read -r set desc tool mi mr sz mo <<<"$r"
        base=$(printf '%s\n' "${rows[@]}" | awk -F'|' -v s="$set" '$1 == s && $3 == "laybak-plaintext" { print $4, $5, $6 }')
        read -r bi br bs <<<"$base"
        rel=$(awk -v a="$mi" -v b="$bi" -v c="$mr" -v d="$br" -v e="$sz" -v f="$bs" \
            'BEGIN { printf "%.2f× / %.2f× / %.3f×", a / b, c / d, e / f }')
        # The same without the fixed cost of opening (the key derivation).
        net=$(awk -v a="$mi" -v b="$bi" -v c="$mr" -v d="$br" -v o="$mo" \
            'BEGIN { printf "%.2f× / %.2f×", (a - o) / b, (c - o) / d }')
        echo "| $set | $desc | $tool | $mi | $mr | $sz | $mo | $rel | $net |"
    done
)
echo
echo "$table"
[ -z "$OUT" ] || echo "$table" >"$OUT"

#!/usr/bin/env bash
# Snapshot latency and the read-only window, on trees a user just walked.
#
#   benches/latency.sh [N...]      tree sizes (default: 10000 100000)
#   SNAPS=30 PROBE_N=20000 benches/latency.sh
#
# For each N (files of 100 bytes, 100 per directory, under WORK): attach,
# then three times each, with the whole tree stat()ed (`du`) first:
#   - a snapshot with nothing changed,
#   - a snapshot after 100 files were appended to.
# Then the probe: a writer appends a line to a file in the volume by path
# every 0.5 ms while SNAPS snapshots run (1% of PROBE_N files changed and the
# tree walked before each); it counts the errors it met (EROFS while the old
# generation is read-only; ENOENT would be a gap) and the lines that landed.
# Needs root and the release binary (cargo build --release). One run; the
# machine's load shows in the numbers.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=${LAYBAK:-$ROOT/target/release/laybak}
WORK=${WORK:-/var/tmp/laybak-latency}
SNAPS=${SNAPS:-30}
PROBE_N=${PROBE_N:-20000}
[ "$(id -u)" = 0 ] || { echo "latency.sh: run as root" >&2; exit 1; }
[ -x "$B" ] || { echo "latency.sh: build $B first (cargo build --release)" >&2; exit 1; }
ms() { echo $(( ($2 - $1) / 1000000 )); }

make_tree() { # DIR N
    python3 - "$1" "$2" <<'P'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i // 100}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "w") as f:
        f.write("x" * 100)
P
}
change() { # VOL N COUNT TAG
    python3 - "$@" <<'P'
import os, sys
vol, n, count, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for i in range(0, n, max(1, n // count)):
    with open(os.path.join(vol, f"d{i // 100}", f"f{i}"), "a") as f:
        f.write(f"{tag}\n")
P
}
setup() { # N
    W=$WORK/$1
    rm -rf "$W"
    mkdir -p "$W/vol"
    export LAYBAK_REPO=$W/repo LAYBAK_STATE_DIR=$W/state LAYBAK_PASSWORD=bench
    make_tree "$W/vol" "$1"
    "$B" init >/dev/null 2>&1
    "$B" attach "$W/vol" >/dev/null
}

for N in "${@:-10000 100000}"; do
    for n in $N; do
        setup "$n"
        for k in 1 2 3; do
            du -s "$W/vol" >/dev/null
            s=$(date +%s%N); "$B" snapshot "$W/vol" >/dev/null; e=$(date +%s%N)
            echo "files=$n walked no-change snapshot: $(ms "$s" "$e") ms"
        done
        for k in 1 2 3; do
            change "$W/vol" "$n" 100 "c$k"
            du -s "$W/vol" >/dev/null
            s=$(date +%s%N); "$B" snapshot "$W/vol" >/dev/null; e=$(date +%s%N)
            echo "files=$n walked 100-file change snapshot: $(ms "$s" "$e") ms"
        done
        "$B" detach "$W/vol" >/dev/null
        rm -rf "$W"
    done
done

setup "$PROBE_N"
python3 - "$W/vol/log" "$W/stop" >"$W/probe.out" <<'P' &
import collections, errno, os, sys, time
path, stop = sys.argv[1], sys.argv[2]
seen = collections.Counter()
while not os.path.exists(stop):
    try:
        with open(path, "a") as f:
            f.write("x\n")
        seen["ok"] += 1
    except OSError as e:
        seen[errno.errorcode[e.errno]] += 1
    time.sleep(0.0005)
print(" ".join(f"{k}={v}" for k, v in sorted(seen.items())))
P
for k in $(seq 1 "$SNAPS"); do
    change "$W/vol" "$PROBE_N" $((PROBE_N / 100)) "p$k"
    du -s "$W/vol" >/dev/null
    "$B" snapshot "$W/vol" >/dev/null
done
touch "$W/stop"
wait
echo "probe over $SNAPS snapshots of a walked $PROBE_N-file volume: $(cat "$W/probe.out"), lines in the file $(wc -l <"$W/vol/log")"
"$B" detach "$W/vol" >/dev/null
rm -rf "$W"

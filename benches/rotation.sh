#!/bin/bash
# Rotation latency on a hot tree: `laybak snapshot` of a 50,500-entry volume,
# walked (find + stat) before each snapshot, with no change and with 1% changed;
# 5 repetitions each. Usage: benches/rotation.sh [LAYBAK_BINARY] [LABEL]
# (default: target/release/laybak). Compare two binaries in one run to get ratios.
set -euo pipefail
L=${1:-$(dirname "$0")/../target/release/laybak}; label=${2:-laybak}
d=$(mktemp -d /var/tmp/rotbench.XXXX)
export LAYBAK_STATE_DIR=$d/state LAYBAK_REPO=$d/repo
mkdir -p $d/vol
python3 - "$d/vol" <<'PY'
import os, sys
root = sys.argv[1]
for i in range(500):
    p = os.path.join(root, "d%03d" % i); os.mkdir(p)
    for j in range(100):
        with open(os.path.join(p, "f%03d" % j), "w") as f: f.write("x" * 100)
PY
export LAYBAK_PASSWORD=bench; $L init >/dev/null 2>&1; $L attach $d/vol >/dev/null
t() { local s=$(date +%s%N); $L snapshot $d/vol >/dev/null; echo $(( ($(date +%s%N) - s) / 1000000 )); }
nc=(); ch=()
for r in 1 2 3 4 5; do
  find $d/vol -exec stat {} + >/dev/null
  nc+=($(t))
  find $d/vol -exec stat {} + >/dev/null
  for i in $(seq 0 4); do for j in $(seq 0 99); do echo y >> $d/vol/d$(printf %03d $((r*5+i)))/f$(printf %03d $j); done; done
  ch+=($(t))
done
echo "$label no-change (hot) ms: ${nc[*]}   1% change (hot) ms: ${ch[*]}"
$L detach $d/vol >/dev/null 2>&1 || true
rm -rf $d

#!/bin/bash
# The live chain's cost to users: a volume next to a plain directory with the
# same contents on the same filesystem, after N snapshots that each touch the
# same hot directories. Prints, per N, the live depth and volume/plain ratios
# for new-name lookups and creates in a hot directory and for a cold
# find+stat of the tree. One run, same machine, ratios from the same run.
# Usage: benches/chain.sh [--max-layers M] [N ...]   (default N: 1 100)
# Needs root (mounts, drop_caches).
set -euo pipefail
L=${LAYBAK:-$(cd "$(dirname "$0")/.." && pwd)/target/release/laybak}
max=64
if [ "${1:-}" = --max-layers ]; then max=$2; shift 2; fi
ns=("$@"); [ ${#ns[@]} -gt 0 ] || ns=(1 100)
probe() { # DIR -> "lookup_us create_us"
python3 - "$1" <<'PY'
import os, sys, time
d = sys.argv[1]
t = time.perf_counter()
for i in range(20000):
    try: os.stat(os.path.join(d, "missing-%d" % i))
    except FileNotFoundError: pass
look = (time.perf_counter() - t) / 20000 * 1e6
t = time.perf_counter()
for i in range(2000):
    open(os.path.join(d, "new-%d-%d" % (os.getpid(), i)), "w").close()
make = (time.perf_counter() - t) / 2000 * 1e6
print("%.2f %.2f" % (look, make))
PY
}
coldfind() { sync; echo 3 > /proc/sys/vm/drop_caches; local s=$(date +%s%N); find "$1" -exec stat {} + >/dev/null; echo $(( ($(date +%s%N) - s) / 1000000 )); }
for n in "${ns[@]}"; do
  d=$(mktemp -d /var/tmp/chainbench.XXXX)
  export LAYBAK_STATE_DIR=$d/state LAYBAK_REPO=$d/repo LAYBAK_PASSWORD=bench
  mkdir -p $d/vol $d/plain
  python3 - "$d/vol" <<'PY'
import os, sys
for i in range(100):
    p = os.path.join(sys.argv[1], "d%02d" % i); os.mkdir(p)
    for j in range(100):
        open(os.path.join(p, "f%03d" % j), "w").write("x")
PY
  $L init >/dev/null 2>&1
  $L attach $d/vol --max-layers $max >/dev/null
  t0=$(date +%s%N)
  for s in $(seq 1 $n); do
    for h in 00 01 02 03 04 05 06 07 08 09; do
      echo $s > $d/vol/d$h/hot-$s; echo $s >> $d/vol/d$h/f000
    done
    $L snapshot $d/vol >/dev/null
  done
  snap_ms=$(( ($(date +%s%N) - t0) / 1000000 / n ))
  cp -a $d/vol/. $d/plain/
  depth=$(grep " $d/vol " /proc/self/mountinfo | grep -o 'lowerdir' | wc -l)
  read vl vc < <(probe $d/vol/d05)
  read pl pc < <(probe $d/plain/d05)
  vf=$(coldfind $d/vol); pf=$(coldfind $d/plain)
  python3 -c "print('N=%-5d max-layers=%-3s depth=%-3s lookup %.2f/%.2f us = %.2fx  create %.2f/%.2f us = %.2fx  cold find+stat %s/%s ms = %.2fx  snapshot %s ms each' % ($n, '$max', '$depth', $vl, $pl, $vl/$pl, $vc, $pc, $vc/$pc, $vf, $pf, $vf/max($pf,1), $snap_ms))"
  $L detach $d/vol >/dev/null 2>&1 || true
  rm -rf $d
done

#!/usr/bin/env bash
# Scale benchmark (issue 14): time and peak memory of laybak's jobs on a
# tree of FILES small files, next to restic on the same tree, one run.
#
# The tree: FILES files of 0-4 KiB (deterministic from SEED) in directories
# of 1,000 files each, two levels deep (a source tree or a mail spool has
# this fan-out; sizes skew small as in home directories). Measured, each
# with /usr/bin/time (wall seconds, peak RSS MiB), page cache warm:
#   attach (initial import)     vs restic backup (first)
#   snapshot, no change         (after `du` walked the tree: hot dentries)
#   snapshot, 1% of files changed
#   restore into tmpfs           vs restic restore into tmpfs
#   check --read-data           vs restic check --read-data
#
# Usage: benches/scale.sh [--smoke] [--big] [--files N] [--no-restic]
#                         [--work DIR] [--laybak BIN] [--keep]
#   --smoke 10,000 files (CI), default 100,000, --big 1,000,000.
# Needs: root, python3, /usr/bin/time; restic unless --no-restic.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FILES=${FILES:-100000}
SEED=${SEED:-1}
WORK=${WORK:-}
LAYBAK=${LAYBAK:-$ROOT/target/release/laybak}
KEEP=0
RESTIC=1
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "scale.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case $1 in
        --smoke) FILES=10000 ;;
        --big) FILES=1000000 ;;
        --files) FILES=${2:?}; shift ;;
        --no-restic) RESTIC=0 ;;
        --work) WORK=${2:?}; shift ;;
        --laybak) LAYBAK=${2:?}; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
[ "$(id -u)" = 0 ] || die "must run as root (laybak attach mounts an overlay)"
[ -x /usr/bin/time ] || die "/usr/bin/time not found: apt-get install time"
[ $RESTIC = 0 ] || command -v restic >/dev/null || die "restic not found: apt-get install restic, or pass --no-restic"
case $LAYBAK in /*) ;; *) LAYBAK=$ROOT/$LAYBAK ;; esac
[ -x "$LAYBAK" ] || die "laybak binary not found at $LAYBAK: run 'cargo build --release' (or set LAYBAK)"
[[ $FILES =~ ^[0-9]+$ && $FILES -gt 0 ]] || die "FILES must be a positive integer"
if [ -z "$WORK" ]; then mkdir -p /var/tmp; WORK=$(mktemp -d /var/tmp/laybak-scale.XXXXXX); fi
cleanup() {
    "$LAYBAK" detach "$WORK/vol" >/dev/null 2>&1 || true
    umount "$WORK/tmpfs" 2>/dev/null || true
    [ $KEEP = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT
export LAYBAK_REPO=$WORK/repo LAYBAK_STATE_DIR=$WORK/state LAYBAK_PASSWORD=bench
export RESTIC_REPOSITORY=$WORK/restic RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$WORK/restic-cache

python3 - "$WORK/vol" "$FILES" "$SEED" <<'PY'
import os, random, sys
root, n, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r = random.Random(seed)
for i in range(n):
    d = os.path.join(root, "d%03d" % (i // 1000 // 100), "e%03d" % (i // 1000 % 100))
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    size = min(int(r.expovariate(1 / 600)), 4096)
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(r.randbytes(size // 2) * 2)
PY
cp -a "$WORK/vol" "$WORK/plain"

# run LABEL CMD...: time one command, print "LABEL seconds MiB".
run() {
    local label=$1; shift
    sync
    /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" \
        || { cat "$WORK/err" >&2; die "$label failed"; }
    read -r secs kib < "$WORK/time"
    printf '%-34s %8.2f s %8d MiB\n' "$label" "$secs" $((kib / 1024))
}

echo "scale.sh: $FILES files, $(du -sh "$WORK/plain" | cut -f1) on disk; laybak $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
"$LAYBAK" init >/dev/null 2>&1
run "laybak attach" "$LAYBAK" attach "$WORK/vol"
[ $RESTIC = 0 ] || { restic init >/dev/null 2>&1; run "restic backup (first)" restic backup -q "$WORK/plain"; }
du -s "$WORK/vol" >/dev/null
run "laybak snapshot, no change (walked)" "$LAYBAK" snapshot "$WORK/vol"
python3 - "$WORK/vol" "$WORK/plain" "$FILES" <<'PY'
import os, sys
vol, plain, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(0, n, 100):
    rel = os.path.join("d%03d" % (i // 1000 // 100), "e%03d" % (i // 1000 % 100), "f%06d" % i)
    for root in (vol, plain):
        with open(os.path.join(root, rel), "ab") as f:
            f.write(b"changed\n")
PY
du -s "$WORK/vol" >/dev/null
run "laybak snapshot, 1% changed" "$LAYBAK" snapshot "$WORK/vol"
[ $RESTIC = 0 ] || run "restic backup, 1% changed" restic backup -q "$WORK/plain"
mkdir -p "$WORK/tmpfs"
mount -t tmpfs -o size=75% tmpfs "$WORK/tmpfs"
snap=$("$LAYBAK" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
run "laybak restore (tmpfs)" "$LAYBAK" restore "$snap" "$WORK/tmpfs/laybak"
n=$(find "$WORK/tmpfs/laybak" -type f | wc -l)
[ "$n" = "$FILES" ] || die "restore holds $n files, not $FILES"
rm -rf "$WORK/tmpfs/laybak"
[ $RESTIC = 0 ] || { run "restic restore (tmpfs)" restic restore latest --target "$WORK/tmpfs/restic"; rm -rf "$WORK/tmpfs/restic"; }
run "laybak check --read-data" "$LAYBAK" check --read-data
[ $RESTIC = 0 ] || run "restic check --read-data" restic check --read-data
echo "layer files: $(ls "$WORK/repo/layers" | wc -l), of which paged (version 4): $(for f in "$WORK"/repo/layers/*; do od -An -tu1 -j7 -N1 "$f"; done | grep -c ' 4$' || true)"

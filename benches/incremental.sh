#!/usr/bin/env bash
# Incremental-backup benchmark: laybak snapshot vs restic backup.
#
# Builds a deterministic tree of FILES files, backs it up once with each tool,
# then REPS times changes CHANGE_PCT% of the files (identically in both copies)
# and times one incremental backup per tool. Prints medians and repo sizes.
#
# Usage: benches/incremental.sh [--smoke] [--files N] [--change-pct P]
#                               [--reps N] [--work DIR] [--laybak BIN] [--keep]
# Env:   FILES (50000) CHANGE_PCT (1) REPS (3) WORK (fresh mktemp -d under
#        /var/tmp) LAYBAK (target/release/laybak) KEEP (0) SEED (1)
#        VERIFY (1: restore laybak's last snapshot and diff it, untimed)
# Needs: root (laybak mounts overlays), python3, restic. Installs nothing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

FILES=${FILES:-50000}
CHANGE_PCT=${CHANGE_PCT:-1}
REPS=${REPS:-3}
WORK=${WORK:-}
LAYBAK=${LAYBAK:-$ROOT/target/release/laybak}
KEEP=${KEEP:-0}
VERIFY=${VERIFY:-1}
SEED=${SEED:-1}
FORGET_SNAPS=${FORGET_SNAPS:-100}   # forget workload: snapshots taken, 90% then forgotten
FORGET_FILES=${FORGET_FILES:-2000}  # ... on a separate tree of this many files

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "incremental.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
        --smoke) FILES=2000; REPS=1; FORGET_SNAPS=10; FORGET_FILES=200 ;;
        --files) FILES=${2:?}; shift ;;
        --change-pct) CHANGE_PCT=${2:?}; shift ;;
        --reps) REPS=${2:?}; shift ;;
        --work) WORK=${2:?}; shift ;;
        --laybak) LAYBAK=${2:?}; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

# ---- prerequisites (one line each, never install anything) ----
[ "$(id -u)" = 0 ] || die "must run as root (laybak attach mounts an overlay)"
command -v restic >/dev/null || die "restic not found: install it first (e.g. apt-get install restic)"
command -v python3 >/dev/null || die "python3 not found: it generates the test tree"
command -v findmnt >/dev/null || die "findmnt not found (util-linux)"
case $LAYBAK in /*) ;; *) LAYBAK=$ROOT/$LAYBAK ;; esac
[ -x "$LAYBAK" ] || die "laybak binary not found at $LAYBAK: run 'cargo build --release' (or set LAYBAK)"
[[ $FILES =~ ^[0-9]+$ && $FILES -gt 0 ]] || die "FILES must be a positive integer"
[[ $REPS =~ ^[0-9]+$ && $REPS -gt 0 ]] || die "REPS must be a positive integer"
[[ $CHANGE_PCT =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "CHANGE_PCT must be a number"

if [ -z "$WORK" ]; then
    mkdir -p /var/tmp
    WORK=$(mktemp -d /var/tmp/laybak-bench.XXXXXX)
else
    mkdir -p "$WORK"
    [ -z "$(ls -A "$WORK")" ] || die "WORK=$WORK is not empty"
fi
WORK=$(cd "$WORK" && pwd)

DATA_L=$WORK/data-laybak     # attached as a laybak volume
DATA_R=$WORK/data-restic     # plain copy for restic
export LAYBAK_REPO=$WORK/laybak-repo LAYBAK_STATE_DIR=$WORK/laybak-state LAYBAK_PASSWORD=bench
export RESTIC_REPOSITORY=$WORK/restic-repo RESTIC_CACHE_DIR=$WORK/restic-cache
LOG=$WORK/log
GEN=$WORK/gen.py
ATTACHED=0

# ---- cleanup: always leave plain directories and no mounts behind ----
FORGET_ATTACHED=0
cleanup() {
    local rc=$?
    set +e
    if [ "$FORGET_ATTACHED" = 1 ]; then
        LAYBAK_REPO=$WORK/forget-laybak-repo "$LAYBAK" detach "$WORK/forget-laybak" >>"$LOG" 2>&1
    fi
    if [ "$ATTACHED" = 1 ]; then
        if ! "$LAYBAK" detach "$DATA_L" >>"$LOG" 2>&1; then
            echo "incremental.sh: laybak detach failed (see $LOG); unmounting by hand" >&2
            umount "$DATA_L" 2>/dev/null
            for b in "$LAYBAK_STATE_DIR"/backing/*; do
                [ -e "$b" ] && umount "$b" 2>/dev/null
            done
        fi
    fi
    if findmnt -rn -o TARGET | awk -v w="$WORK" '$0 == w || index($0, w "/") == 1 { f = 1 } END { exit !f }'; then
        echo "incremental.sh: mounts remain under $WORK; not removing it" >&2
        [ $rc = 0 ] && rc=1
    elif [ "$KEEP" = 1 ]; then
        echo "incremental.sh: kept $WORK (log: $LOG)" >&2
    else
        rm -rf --one-file-system "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- deterministic tree generator / mutator ----
cat >"$GEN" <<'PY'
import os, random, sys

WORDS = ("alpha beta gamma delta layer overlay backup snapshot restic "
         "chunk pack index tree blob file dir upper lower merged work seal "
         "archive restore mount volume repo zstd blake3 hash fold log").split()

def text_pool(rng, n):
    out, size = [], 0
    while size < n:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "\n"
        out.append(line); size += len(line)
    return "".join(out).encode()[:n]

POOL = text_pool(random.Random("pool"), 4 << 20)

def content(rng, size, tag):
    """Unique header, then a mix of incompressible and text-like blocks."""
    buf = bytearray(f"{tag}\n".encode())
    comp = rng.random()  # fraction of compressible blocks in this file
    while len(buf) < size:
        n = min(rng.randint(512, 8192), size - len(buf))
        if rng.random() < comp:
            o = rng.randrange(0, len(POOL) - n)
            buf += POOL[o:o + n]
        else:
            buf += rng.randbytes(n)
    return bytes(buf[:size])

def pick_size(rng):
    if rng.random() < 0.01:                       # ~1%: 100 KiB .. 1 MiB
        return int(rng.uniform(100 << 10, 1 << 20))
    return int(2 ** rng.uniform(10, 14))          # 1 .. 16 KiB, log-uniform

def rel_path(i):
    d = i // 100
    return f"d{d // 100:03d}/d{d % 100:02d}/f{i:06d}.dat"

def gen(root, n, seed):
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        p = os.path.join(root, rel_path(i))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(content(rng, pick_size(rng), p[len(root):]))

def listing(root):
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            out.append(os.path.relpath(os.path.join(d, f), root))
    return out

def mutate(rep, pct, seed, roots):
    files = listing(roots[-1])            # a plain directory
    rng = random.Random(f"{seed}:mutate:{rep}")
    k = max(1, round(len(files) * pct / 100))
    chosen = rng.sample(files, min(k, len(files)))
    ops = {"overwrite": 0, "append": 0, "delete": 0, "add": 0}
    acts = []
    for j, rel in enumerate(chosen):
        r = rng.random()
        op = "overwrite" if r < 0.4 else "append" if r < 0.7 else "delete" if r < 0.85 else "add"
        ops[op] += 1
        if op == "overwrite":
            acts.append((op, rel, content(rng, pick_size(rng), f"rep{rep}:{rel}")))
        elif op == "append":
            acts.append((op, rel, rng.randbytes(rng.randint(64, 8192))))
        elif op == "delete":
            acts.append((op, rel, None))
        else:
            new = os.path.join(os.path.dirname(rel), f"n{rep:03d}_{j:06d}.dat")
            acts.append((op, new, content(rng, pick_size(rng), f"rep{rep}:{new}")))
    for root in roots:
        for op, rel, data in acts:
            p = os.path.join(root, rel)
            if op == "delete":
                os.unlink(p)
            else:
                with open(p, "ab" if op == "append" else "wb") as f:
                    f.write(data)
    print(len(chosen), " ".join(f"{o}={n}" for o, n in ops.items()))

def summary(root):
    n = size = 0
    for d, _, files in os.walk(root):
        for f in files:
            n += 1; size += os.lstat(os.path.join(d, f)).st_size
    print(n, size)

cmd = sys.argv[1]
if cmd == "gen":
    gen(sys.argv[2], int(sys.argv[3]), sys.argv[4])
elif cmd == "mutate":
    mutate(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5:])
elif cmd == "summary":
    summary(sys.argv[2])
PY

# ---- helpers ----
now() { date +%s.%N; }
# elapsed START -> seconds with 3 decimals
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# run CMD..., appending its output to $LOG; on failure show the tail of it
run() {
    echo "+ $*" >>"$LOG"
    if ! "$@" >>"$LOG" 2>&1; then
        echo "incremental.sh: command failed: $*" >&2
        tail -n 20 "$LOG" >&2
        return 1
    fi
}
size_of() { du -sb "$1" | cut -f1; }
human() { awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u); i = 1
    while (b >= 1024 && i < 5) { b /= 1024; i++ } printf (i == 1 ? "%d %s" : "%.1f %s"), b, u[i] }'; }

RESTIC_NOPW=()
if restic init --help 2>&1 | grep -q -- --insecure-no-password; then
    RESTIC_NOPW=(--insecure-no-password)
else
    export RESTIC_PASSWORD=bench
fi

# ---- machine ----
echo "== machine"
echo "nproc:        $(nproc)"
echo "kernel:       $(uname -sr)"
echo "work fs:      $(findmnt -n -o FSTYPE,SOURCE --target "$WORK" | tr -s ' ') ($WORK)"
echo "loadavg:      $(cut -d' ' -f1-3 /proc/loadavg)"
echo "laybak:       $("$LAYBAK" --version)"
echo "restic:       $(restic version | head -n1)"
echo "params:       FILES=$FILES CHANGE_PCT=$CHANGE_PCT REPS=$REPS SEED=$SEED"

# ---- data ----
echo "== generating $FILES files"
t=$(now)
mkdir "$DATA_L"
python3 "$GEN" gen "$DATA_L" "$FILES" "$SEED"
cp -a "$DATA_L" "$DATA_R"
out=$(python3 "$GEN" summary "$DATA_R")
read -r NFILES TREE_BYTES <<<"$out"
sync
echo "tree:         $NFILES files, $(human "$TREE_BYTES") (generated in $(since "$t") s)"

# ---- initial backups ----
echo "== initial backups"
run "$LAYBAK" init
sync
t=$(now)
ATTACHED=1
run "$LAYBAK" attach "$DATA_L"
L_INIT=$(since "$t")
echo "laybak attach:   ${L_INIT} s"

run restic init "${RESTIC_NOPW[@]}"
sync
t=$(now)
run restic backup "${RESTIC_NOPW[@]}" --host bench "$DATA_R"
R_INIT=$(since "$t")
echo "restic backup:   ${R_INIT} s"

# ---- incremental repetitions ----
L_TIMES=(); R_TIMES=(); CHANGED=()
for ((rep = 1; rep <= REPS; rep++)); do
    out=$(python3 "$GEN" mutate "$rep" "$CHANGE_PCT" "$SEED" "$DATA_L" "$DATA_R")
    read -r n ops <<<"$out"
    CHANGED+=("$n")
    sync
    t=$(now)
    run "$LAYBAK" snapshot "$DATA_L"
    lt=$(since "$t")
    sync
    t=$(now)
    run restic backup "${RESTIC_NOPW[@]}" --host bench "$DATA_R"
    rt=$(since "$t")
    L_TIMES+=("$lt"); R_TIMES+=("$rt")
    echo "rep $rep: $n changed ($ops)  laybak ${lt} s  restic ${rt} s"
done

# Both trees must still hold the same data.
a=$(python3 "$GEN" summary "$DATA_L"); b=$(python3 "$GEN" summary "$DATA_R")
[ "$a" = "$b" ] || die "trees diverged: laybak volume has '$a', restic copy has '$b' (files bytes)"

if [ "$VERIFY" = 1 ]; then
    run "$LAYBAK" restore latest "$WORK/verify"
    diff -r "$WORK/verify" "$DATA_R" >>"$LOG" 2>&1 ||
        die "laybak restore of the last snapshot differs from the source (see $LOG)"
    rm -rf "$WORK/verify"
    echo "verify:          laybak restore of last snapshot == source"
fi

L_MED=$(median "${L_TIMES[@]}")
R_MED=$(median "${R_TIMES[@]}")
SPEEDUP=$(awk -v r="$R_MED" -v l="$L_MED" 'BEGIN { if (l > 0) printf "%.1fx", r / l; else print "inf" }')
L_REPO=$(size_of "$LAYBAK_REPO")
R_REPO=$(size_of "$RESTIC_REPOSITORY")
CHG=$(median "${CHANGED[@]}"); CHG=${CHG%.000}

echo "== results (medians of $REPS reps; wall clock, warm page cache)"
printf '%-34s %s\n' \
    "files"                          "$FILES ($(human "$TREE_BYTES"))" \
    "changed files per rep"          "$CHG (${CHANGE_PCT}%)" \
    "laybak initial (attach)"        "${L_INIT} s" \
    "restic initial (backup)"        "${R_INIT} s" \
    "laybak incremental (snapshot)"  "${L_MED} s" \
    "restic incremental (backup)"    "${R_MED} s" \
    "speedup (restic/laybak)"        "$SPEEDUP" \
    "laybak repo size"               "$L_REPO B ($(human "$L_REPO"))" \
    "restic repo size"               "$R_REPO B ($(human "$R_REPO"))"

# ---- forget 90% of FORGET_SNAPS snapshots, then prune ----
# A separate small tree (restic walks all of it on each of its backups).
echo "== forget + prune: $FORGET_SNAPS snapshots of $FORGET_FILES files, keep the newest 10%"
FL=$WORK/forget-laybak; FR=$WORK/forget-restic
export LAYBAK_REPO=$WORK/forget-laybak-repo RESTIC_REPOSITORY=$WORK/forget-restic-repo
mkdir "$FL"
python3 "$GEN" gen "$FL" "$FORGET_FILES" "$SEED-forget"
cp -a "$FL" "$FR"
run "$LAYBAK" init
run "$LAYBAK" attach "$FL" --name forgetvol
FORGET_ATTACHED=1
run restic init "${RESTIC_NOPW[@]}"
run restic backup "${RESTIC_NOPW[@]}" --host bench "$FR"
for ((i = 2; i <= FORGET_SNAPS; i++)); do
    python3 "$GEN" mutate "$((1000 + i))" 2 "$SEED" "$FL" "$FR" >/dev/null
    run "$LAYBAK" snapshot "$FL"
    run restic backup "${RESTIC_NOPW[@]}" --host bench "$FR"
done
KEEP_N=$(( (FORGET_SNAPS + 9) / 10 ))
sync
lb0=$(size_of "$LAYBAK_REPO"); rb0=$(size_of "$RESTIC_REPOSITORY")
t=$(now)
run "$LAYBAK" forget --keep-last "$KEEP_N" --prune
LF_T=$(since "$t")
t=$(now)
run restic forget "${RESTIC_NOPW[@]}" --keep-last "$KEEP_N" --prune
RF_T=$(since "$t")
lb1=$(size_of "$LAYBAK_REPO"); rb1=$(size_of "$RESTIC_REPOSITORY")
run "$LAYBAK" check --read-data
run "$LAYBAK" detach "$FL"
FORGET_ATTACHED=0
printf '%-34s %s\n' \
    "laybak forget+prune"            "${LF_T} s, freed $((lb0 - lb1)) B ($(human $((lb0 - lb1)))), repo now $(human "$lb1")" \
    "restic forget --prune"          "${RF_T} s, freed $((rb0 - rb1)) B ($(human $((rb0 - rb1)))), repo now $(human "$rb1")"

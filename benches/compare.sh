#!/usr/bin/env bash
# Side-by-side benchmark: laybak vs restic vs borg vs tar|zstd.
#
# Builds deterministic data sets from a seed and times, for every tool, in the
# same run and interleaved (the tool order rotates from rep to rep):
#   initial    first backup of the whole tree (laybak: attach)
#   incr       backup after CHANGE_PCT% of the files changed (modify/add/delete)
#   incr100    backup after exactly 100 files changed (same change on every tree)
#   incrwalk   as incr, but every tree is walked (du) before each backup: the
#              dentries are hot, as on a server where users just ran find/git
#   nochange   backup with nothing changed
#   copyup     backup after 1 MiB was overwritten inside the big (1 GiB) file
#   restore    restore of the latest snapshot, and of the oldest of the last 10
#   forget     forget 90% of 100 snapshots + prune
# plus repository sizes and the peak RSS (/usr/bin/time -v) of every run.
# Every figure is reported next to a ratio against laybak measured in the
# same run (median over reps of the per-rep ratio).
#
# Usage: benches/compare.sh [--smoke] [--big] [--sets LIST] [--reps N]
#            [--heavy-reps N] [--large-size SIZE] [--work DIR] [--laybak BIN]
#            [--docs DIR | --no-docs] [--keep] [--no-verify]
#   --smoke        tiny trees, 1 rep, well under a minute (CI); does not
#                  write docs/ unless --docs is given
#   --big          also the 1,000,000-file tree (slow: ~12 GiB, ~70 GB free disk)
#   --sets LIST    comma-separated subset of: small-10k small-100k small-1M
#                  large real
#   --reps N       reps of the cheap workloads (default 5)
#   --heavy-reps N reps of initial/restore/copyup and of the 1M tree (default 3)
#   --large-size S total size of the big-file set, e.g. 2G (default), 512M
#   --docs DIR     write BENCHMARKS.md and benchmarks.svg there (default: the
#                  repository's docs/ for a normal run)
# Env:   LAYBAK (target/release/laybak of this repository), LAYBAK_COMMIT (for
#        the report, when LAYBAK was built elsewhere), REPS, HEAVY_REPS,
#        LARGE_SIZE, WORK (fresh mktemp -d under /var/tmp), SEED (1),
#        REAL_SRC (/usr/share), KEEP (0), VERIFY (1)
# Needs: root, python3, /usr/bin/time (GNU time), restic, borg, zstd, GNU tar:
#        apt-get install restic borgbackup zstd time. Installs nothing.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GEN=$ROOT/benches/gen_tree.py
ORIG_ARGS=("$@")

LAYBAK=${LAYBAK:-$ROOT/target/release/laybak}
REPS=${REPS:-5}
HEAVY_REPS=${HEAVY_REPS:-3}
LARGE_SIZE=${LARGE_SIZE:-2G}
WORK=${WORK:-}
SEED=${SEED:-1}
REAL_SRC=${REAL_SRC:-/usr/share}
KEEP=${KEEP:-0}
VERIFY=${VERIFY:-1}
CHANGE_PCT=1
FORGET_N=100            # snapshots before forget; keep the last 10%
RESTORE_DEPTH=10        # "restore the oldest of RESTORE_DEPTH snapshots"
INCR_N=100              # files changed by the incr100 workload
POKE_BYTES=$((1 << 20)) # the copy-up change
SMOKE=0
BIG=0
SETS=""
DOCS=""
NO_DOCS=0

usage() { sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "compare.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
        --smoke) SMOKE=1 ;;
        --big) BIG=1 ;;
        --sets) SETS=${2:?}; shift ;;
        --reps) REPS=${2:?}; shift ;;
        --heavy-reps) HEAVY_REPS=${2:?}; shift ;;
        --large-size) LARGE_SIZE=${2:?}; shift ;;
        --work) WORK=${2:?}; shift ;;
        --laybak) LAYBAK=${2:?}; shift ;;
        --docs) DOCS=${2:?}; shift ;;
        --no-docs) NO_DOCS=1 ;;
        --keep) KEEP=1 ;;
        --no-verify) VERIFY=0 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

# Data set sizes.
N_10K=10000 N_100K=100000 N_1M=1000000
REAL_MAX=0               # 0 = all of REAL_SRC
if [ "$SMOKE" = 1 ]; then
    REPS=1 HEAVY_REPS=1
    N_10K=150 N_100K=400 N_1M=1000
    LARGE_SIZE=8M REAL_MAX=300 FORGET_N=5 RESTORE_DEPTH=3 INCR_N=10
    [ -z "$SETS" ] && SETS="small-10k,large"   # the other sets run the same code paths
fi
if [ -z "$SETS" ]; then
    SETS="small-10k,small-100k,large,real"
    [ "$BIG" = 1 ] && SETS="small-10k,small-100k,small-1M,large,real"
fi
IFS=, read -r -a SET_LIST <<<"$SETS"
for s in "${SET_LIST[@]}"; do
    case $s in small-10k|small-100k|small-1M|large|real) ;;
        *) die "unknown set '$s' (small-10k small-100k small-1M large real)" ;; esac
done

LARGE_BYTES=$(numfmt --from=iec "$LARGE_SIZE" 2>/dev/null) || die "bad --large-size '$LARGE_SIZE' (e.g. 2G, 512M)"

# ---- prerequisites (one line each, never install anything) ----
PREREQ="apt-get install restic borgbackup zstd time"
[ "$(id -u)" = 0 ] || die "must run as root (laybak attach mounts an overlay)"
for c in python3 restic borg zstd tar findmnt; do
    command -v "$c" >/dev/null || die "$c not found: install the prerequisites first ($PREREQ)"
done
[ -x /usr/bin/time ] || die "/usr/bin/time (GNU time) not found: install the prerequisites first ($PREREQ)"
tar --version 2>/dev/null | grep -q 'GNU tar' || die "GNU tar required (--listed-incremental)"
case $LAYBAK in /*) ;; *) LAYBAK=$PWD/$LAYBAK ;; esac
[ -x "$LAYBAK" ] || die "laybak binary not found at $LAYBAK: run 'cargo build --release' (or set LAYBAK)"
[ -f "$GEN" ] || die "missing $GEN"
for v in REPS HEAVY_REPS; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer"
done
[ "$LARGE_BYTES" -ge $((4 << 20)) ] || die "--large-size must be at least 4M"
[ -d "$REAL_SRC" ] || die "REAL_SRC=$REAL_SRC is not a directory"

if [ -z "$DOCS" ] && [ "$SMOKE" = 0 ] && [ "$NO_DOCS" = 0 ]; then DOCS=$ROOT/docs; fi
[ "$NO_DOCS" = 1 ] && DOCS=""

if [ -z "$WORK" ]; then
    mkdir -p /var/tmp
    WORK=$(mktemp -d /var/tmp/laybak-compare.XXXXXX)
else
    mkdir -p "$WORK"
    [ -z "$(ls -A "$WORK")" ] || die "WORK=$WORK is not empty"
fi
WORK=$(cd "$WORK" && pwd)

# Rough free-space need: the biggest set twice, four repositories, restores.
need=$((3 << 30))
for s in "${SET_LIST[@]}"; do
    case $s in
        small-100k) n=$((N_100K * 13 * 1024 * 9)) ;;
        small-1M) n=$((N_1M * 13 * 1024 * 5)) ;;
        large) n=$((LARGE_BYTES * 9)) ;;
        *) n=0 ;;
    esac
    [ "$n" -gt "$need" ] && need=$n
done
[ "$SMOKE" = 1 ] && need=$((200 << 20))
avail=$(df -B1 --output=avail "$WORK" | tail -n 1 | tr -d ' ')
[ "$avail" -ge "$need" ] || die "about $((need >> 30)) GiB free needed in $WORK, only $((avail >> 30)) GiB there"

LOG=$WORK/log
T0_MS=$(( ${EPOCHREALTIME/./} / 1000 ))
RESULTS=$WORK/results.tsv   # set  workload  tool  rep  metric  value
SETINFO=$WORK/sets.tsv      # set  files  bytes  description
META=$WORK/meta.tsv         # key  value
TIMEF=$WORK/time.out
: >"$RESULTS"; : >"$SETINFO"; : >"$META"
TOOLS=(laybak restic borg tar)
export RESTIC_PASSWORD=bench
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export BORG_DISPLAY_PASSPHRASE=no

# ---- cleanup: always leave plain directories and no mounts behind ----
ATTACHED=()   # "VOL STATE REPO" of attached volumes
cleanup() {
    local rc=$?
    set +e
    for a in "${ATTACHED[@]}"; do
        read -r vol st repo <<<"$a"
        if ! LAYBAK_STATE_DIR=$st LAYBAK_REPO=$repo "$LAYBAK" detach "$vol" >>"$LOG" 2>&1; then
            echo "compare.sh: laybak detach $vol failed (see $LOG); unmounting by hand" >&2
            umount "$vol" 2>/dev/null
            for b in "$st"/backing/*; do [ -e "$b" ] && umount "$b" 2>/dev/null; done
            chattr -i "$vol" 2>/dev/null   # laybak keeps the underlying directory immutable
        fi
    done
    if findmnt -rn -o TARGET | awk -v w="$WORK" '$0 == w || index($0, w "/") == 1 { f = 1 } END { exit !f }'; then
        echo "compare.sh: mounts remain under $WORK; not removing it" >&2
        [ $rc = 0 ] && rc=1
    elif [ "$KEEP" = 1 ] || [ $rc != 0 ]; then
        echo "compare.sh: kept $WORK (log: $LOG)" >&2
    else
        rm -rf --one-file-system "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- helpers ----
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }
log() { printf '[%.3f] %s\n' "$(( ${EPOCHREALTIME/./} / 1000 - T0_MS ))e-3" "$*" >>"$LOG"; }
say() { echo "$*"; log "== $*"; }
# run CMD...: untimed, output to the log; on failure show the tail of it
run() {
    log "+ $*"
    if ! "$@" >>"$LOG" 2>&1; then
        echo "compare.sh: command failed: $*" >&2
        tail -n 20 "$LOG" >&2
        return 1
    fi
}
rec() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }
size_of() { if [ -e "$1" ]; then du -sb "$1" | cut -f1; else echo 0; fi; }
# measure WORKLOAD TOOL REP CMD...: one timed run (wall clock, peak RSS,
# user+sys CPU) recorded for the current set; sets LAST (seconds).
measure() {
    local wl=$1 tool=$2 rep=$3; shift 3
    sync
    log "+ [$SET $wl $tool rep $rep] $*"
    local t0=$EPOCHREALTIME
    if ! /usr/bin/time -v -o "$TIMEF" "$@" >>"$LOG" 2>&1; then
        echo "compare.sh: command failed ($SET $wl $tool): $*" >&2
        tail -n 25 "$LOG" >&2
        return 1
    fi
    LAST=$(since "$t0")
    local rss cpu
    read -r rss cpu < <(awk -F': ' '/Maximum resident set size/ { r = $2 }
        /User time/ { u = $2 } /System time/ { s = $2 } END { printf "%d %.2f\n", r, u + s }' "$TIMEF")
    rec "$SET" "$wl" "$tool" "$rep" secs "$LAST"
    rec "$SET" "$wl" "$tool" "$rep" rss_kb "$rss"
    rec "$SET" "$wl" "$tool" "$rep" cpu_s "$cpu"
    log "  -> ${LAST}s rss ${rss}KiB cpu ${cpu}s"
}
# The tool order for rep N: TOOLS rotated by N-1.
order() {
    local r=$(( ($1 - 1) % ${#TOOLS[@]} )) i
    ORDER=()
    for ((i = 0; i < ${#TOOLS[@]}; i++)); do ORDER+=("${TOOLS[$(( (i + r) % ${#TOOLS[@]} ))]}"); done
}

# ---- per-set environment ----
set_env() {
    SET=$1
    S=$WORK/$SET
    PLAIN=$S/plain          # plain copy, read by restic, borg and tar
    VOL=$S/vol              # the laybak volume (same contents)
    VNAME=$SET
    export LAYBAK_REPO=$S/laybak-repo LAYBAK_STATE_DIR=$S/laybak-state LAYBAK_PASSWORD=bench
    export RESTIC_REPOSITORY=$S/restic-repo RESTIC_CACHE_DIR=$S/restic-cache
    export BORG_REPO=$S/borg-repo BORG_BASE_DIR=$S/borg-base
    TARD=$S/tar
    NSNAP=0                 # snapshots each tool holds in this set
}
repo_of() {
    case $1 in
        laybak) echo "$LAYBAK_REPO" ;; restic) echo "$RESTIC_REPOSITORY" ;;
        borg) echo "$BORG_REPO" ;; tar) echo "$TARD" ;;
    esac
}
is_attached() { findmnt -rn -o TARGET | grep -qxF "$VOL"; }
attached_add() { ATTACHED+=("$VOL $LAYBAK_STATE_DIR $LAYBAK_REPO"); }
attached_del() {
    local a keep=()
    for a in "${ATTACHED[@]}"; do [ "${a%% *}" = "$VOL" ] || keep+=("$a"); done
    ATTACHED=("${keep[@]}")
}
laybak_detach() { run "$LAYBAK" detach "$VOL"; attached_del; }

# Fresh, empty repository for TOOL.
tool_init() {
    case $1 in
        laybak)
            if is_attached; then laybak_detach; fi
            rm -rf "$LAYBAK_REPO" "$LAYBAK_STATE_DIR"
            run "$LAYBAK" init ;;
        restic) rm -rf "$RESTIC_REPOSITORY" "$RESTIC_CACHE_DIR"; run restic init ;;
        borg) rm -rf "$BORG_REPO" "$BORG_BASE_DIR"; run borg init -e none ;;
        tar) rm -rf "$TARD"; mkdir -p "$TARD" ;;
    esac
}
# CMD = the command that takes snapshot number NSNAP of the current contents.
snap_cmd() {
    local name; name=$(printf 's%04d' "$NSNAP")
    case $1 in
        laybak)
            if [ "$NSNAP" = 0 ]; then CMD=("$LAYBAK" attach --name "$VNAME" "$VOL")
            else CMD=("$LAYBAK" snapshot "$VOL"); fi ;;
        restic) CMD=(env -C "$PLAIN" restic backup --host bench .) ;;
        borg) CMD=(env -C "$PLAIN" borg create --compression zstd,3 "::$name" .) ;;
        tar) CMD=(bash -c 'set -o pipefail; tar -C "$1" -g "$2/snar" -cf - . | zstd -T0 -3 -q -o "$2/$3.tar.zst" && sync -f "$2"' _ "$PLAIN" "$TARD" "$name") ;;
    esac
}
# Untimed snapshot with every tool (to build history).
snap_all_untimed() {
    local t
    for t in "${TOOLS[@]}"; do snap_cmd "$t"; run "${CMD[@]}"; done
    NSNAP=$((NSNAP + 1))
}
# CMD = restore snapshot number IDX (0-based, oldest first) into TARGET.
restore_cmd() {
    local tool=$1 idx=$2 target=$3 id name
    name=$(printf 's%04d' "$idx")
    case $tool in
        laybak)
            id=$("$LAYBAK" snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[int(sys.argv[1])]["id"])' "$idx")
            CMD=("$LAYBAK" restore "$id" "$target") ;;
        restic)
            id=$(restic snapshots --json | python3 -c 'import json,sys; s=sorted(json.load(sys.stdin), key=lambda x: x["time"]); print(s[int(sys.argv[1])]["id"])' "$idx")
            CMD=(bash -c 'restic restore "$1" --target "$2" && sync -f "$2"' _ "$id" "$target") ;;
        borg) CMD=(bash -c 'mkdir -p "$2" && cd "$2" && borg extract "::$1" && sync -f .' _ "$name" "$target") ;;
        tar)
            CMD=(bash -c 'set -o pipefail; t=$1 d=$2 n=$3; mkdir -p "$t"
                for ((i = 0; i <= n; i++)); do
                    zstd -dcq "$d/$(printf s%04d "$i").tar.zst" | tar -C "$t" -g /dev/null -xf - || exit 1
                done; sync -f "$t"' _ "$target" "$TARD" "$idx") ;;
    esac
}
record_sizes() {   # record_sizes LABEL: repository size of every tool
    local t
    for t in "${TOOLS[@]}"; do rec "$SET" "$1" "$t" 0 size_b "$(size_of "$(repo_of "$t")")"; done
}
local_store() { size_of "$LAYBAK_STATE_DIR/backing/$VNAME/.laybak"; }

# ---- data sets ----
make_set() {
    local desc t0=$EPOCHREALTIME
    mkdir -p "$S"
    case $SET in
        small-10k|small-100k|small-1M)
            local n=$N_10K
            [ "$SET" = small-100k ] && n=$N_100K
            [ "$SET" = small-1M ] && n=$N_1M
            run python3 "$GEN" small "$PLAIN" "$n" "$SEED"
            desc="source-tree-like: $n files, 64 B-2 MiB (most 1-16 KiB), ~60 per dir, partly compressible" ;;
        large)
            run python3 "$GEN" large "$PLAIN" "$LARGE_BYTES" "$SEED"
            desc="4 big files (1/2, 1/4, 1/8, 1/8 of $LARGE_SIZE), 50/30/70/0% compressible" ;;
        real)
            if [ "$REAL_MAX" -gt 0 ]; then run python3 "$GEN" copy "$REAL_SRC" "$PLAIN" "$REAL_MAX"
            else run cp -a "$REAL_SRC" "$PLAIN"; fi
            desc="copy of $REAL_SRC"
            [ "$REAL_MAX" -gt 0 ] && desc="first $REAL_MAX files of $REAL_SRC" ;;
    esac
    run cp -a "$PLAIN" "$VOL"
    local out files bytes
    out=$(python3 "$GEN" summary "$PLAIN")
    read -r files bytes <<<"$out"
    printf '%s\t%s\t%s\t%s\n' "$SET" "$files" "$bytes" "$desc" >>"$SETINFO"
    SET_FILES=$files SET_BYTES=$bytes
    sync
    say "$SET: $files files, $(human "$bytes") (made in $(since "$t0") s)"
}
human() { awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u); i = 1
    while (b >= 1024 && i < 5) { b /= 1024; i++ } printf (i == 1 ? "%d %s" : "%.1f %s"), b, u[i] }'; }

# ---- workloads ----
w_initial() {   # w_initial REPS
    local reps=$1 rep t
    say "$SET: initial backup x$reps"
    for ((rep = 1; rep <= reps; rep++)); do
        order "$rep"
        for t in "${ORDER[@]}"; do
            tool_init "$t"
            snap_cmd "$t"
            [ "$t" = laybak ] && attached_add
            measure initial "$t" "$rep" "${CMD[@]}"
        done
    done
    NSNAP=1
    record_sizes size-initial
    rec "$SET" local-initial laybak 0 size_b "$(local_store)"
}
# w_change WORKLOAD REPS: change (incr: CHANGE_PCT% of files; incr100: 100
# files; nochange: nothing; copyup: POKE_BYTES inside file0.bin), then one
# timed backup per tool.
w_change() {
    local wl=$1 reps=$2 rep t out before pct
    say "$SET: $wl x$reps"
    for ((rep = 1; rep <= reps; rep++)); do
        case $wl in
            incr|incr100|incrwalk)
                pct=$CHANGE_PCT; [ "$wl" = incr100 ] && pct="=$INCR_N"
                out=$(python3 "$GEN" mutate "$wl$NSNAP" "$pct" "$SEED" "$VOL" "$PLAIN")
                log "mutate: $out"; rec "$SET" "$wl" all "$rep" changed "${out%% *}" ;;
            copyup)
                out=$(python3 "$GEN" poke file0.bin "$POKE_BYTES" "$SEED" "$NSNAP" "$VOL" "$PLAIN")
                log "poke: $out"
                read -r _ wv wp <<<"$out"
                rec "$SET" "$wl" laybak "$rep" write_s "$wv"
                rec "$SET" "$wl" plain "$rep" write_s "$wp" ;;
        esac
        order "$rep"
        for t in "${ORDER[@]}"; do
            before=$(size_of "$(repo_of "$t")")
            # Untimed: stat every entry, so the backup meets hot dentries.
            [ "$wl" = incrwalk ] && du -s "$VOL" "$PLAIN" >/dev/null
            snap_cmd "$t"
            measure "$wl" "$t" "$rep" "${CMD[@]}"
            rec "$SET" "$wl" "$t" "$rep" growth_b $(( $(size_of "$(repo_of "$t")") - before ))
        done
        [ "$wl" = copyup ] && rec "$SET" "$wl" laybak "$rep" local_b "$(local_store)"
        NSNAP=$((NSNAP + 1))
    done
}
# w_restore REPS WHICH...: WHICH is latest or oldest (the oldest of the last
# RESTORE_DEPTH snapshots; history is topped up first). Rep 1 checks the result.
w_restore() {
    local reps=$1 which rep t idx target; shift
    for which in "$@"; do
        if [ "$which" = oldest ]; then
            while [ "$NSNAP" -lt "$RESTORE_DEPTH" ]; do
                out=$(python3 "$GEN" mutate "top$NSNAP" "$CHANGE_PCT" "$SEED" "$VOL" "$PLAIN")
                snap_all_untimed
            done
            idx=$((NSNAP - RESTORE_DEPTH))
        else
            idx=$((NSNAP - 1))
        fi
        say "$SET: restore $which (snapshot $((idx + 1)) of $NSNAP) x$reps"
        for ((rep = 1; rep <= reps; rep++)); do
            order "$rep"
            for t in "${ORDER[@]}"; do
                target=$S/restore-$t
                rm -rf "$target"
                restore_cmd "$t" "$idx" "$target"
                measure "restore-$which" "$t" "$rep" "${CMD[@]}"
            done
            if [ "$rep" = 1 ] && [ "$VERIFY" = 1 ]; then
                # latest must equal the source; every tool must agree with laybak
                [ "$which" = latest ] && verify_same "$PLAIN" "$S/restore-laybak" "laybak restore of the latest snapshot"
                for t in restic borg tar; do
                    verify_same "$S/restore-laybak" "$S/restore-$t" "$t vs laybak restore ($which)"
                done
            fi
            for t in "${TOOLS[@]}"; do rm -rf "$S/restore-$t"; done
        done
    done
}
verify_same() {
    if ! diff -r --no-dereference -x .laybak "$1" "$2" >>"$LOG" 2>&1; then
        die "$3 differs ($1 vs $2; see $LOG)"
    fi
    log "verify ok: $3"
}
# w_forget REPS: build FORGET_N snapshots (1% changed each), then forget
# all but the last 10% and prune, each rep on a fresh copy of the repository.
w_forget() {
    local reps=$1 rep t keep=$(( FORGET_N >= 20 ? FORGET_N / 10 : 1 )) out
    say "$SET: building $FORGET_N snapshots (have $NSNAP)"
    while [ "$NSNAP" -lt "$FORGET_N" ]; do
        out=$(python3 "$GEN" mutate "fg$NSNAP" "$CHANGE_PCT" "$SEED" "$VOL" "$PLAIN")
        snap_all_untimed
    done
    record_sizes size-before-forget
    run cp -a "$LAYBAK_REPO" "$S/laybak-repo.0"
    run cp -a "$RESTIC_REPOSITORY" "$S/restic-repo.0"; run cp -a "$RESTIC_CACHE_DIR" "$S/restic-cache.0"
    run cp -a "$BORG_REPO" "$S/borg-repo.0"; run cp -a "$BORG_BASE_DIR" "$S/borg-base.0"
    say "$SET: forget $((FORGET_N - keep)) of $FORGET_N snapshots + prune x$reps"
    for ((rep = 1; rep <= reps; rep++)); do
        order "$rep"
        for t in "${ORDER[@]}"; do
            case $t in
                laybak)
                    # older laybak builds have no forget: the report says "not yet implemented"
                    "$LAYBAK" forget --help >/dev/null 2>&1 || continue
                    rm -rf "$LAYBAK_REPO"
                    cp -a "$S/laybak-repo.0" "$LAYBAK_REPO"
                    measure forget laybak "$rep" "$LAYBAK" forget --keep-last "$keep" --prune ;;
                restic)
                    rm -rf "$RESTIC_REPOSITORY" "$RESTIC_CACHE_DIR"
                    cp -a "$S/restic-repo.0" "$RESTIC_REPOSITORY"; cp -a "$S/restic-cache.0" "$RESTIC_CACHE_DIR"
                    measure forget restic "$rep" restic forget --keep-last "$keep" --prune ;;
                borg)
                    rm -rf "$BORG_REPO" "$BORG_BASE_DIR"
                    cp -a "$S/borg-repo.0" "$BORG_REPO"; cp -a "$S/borg-base.0" "$BORG_BASE_DIR"
                    measure forget borg "$rep" bash -c 'borg prune --keep-last "$1" && borg compact' _ "$keep" ;;
            esac
        done
    done
    rm -rf "$S"/laybak-repo.0 "$S"/restic-repo.0 "$S"/restic-cache.0 "$S"/borg-repo.0 "$S"/borg-base.0
}

finish_set() {
    record_sizes size-final
    rec "$SET" local-final laybak 0 size_b "$(local_store)"
    laybak_detach
    a=$(python3 "$GEN" summary "$VOL"); b=$(python3 "$GEN" summary "$PLAIN")
    [ "$a" = "$b" ] || die "$SET: the detached volume ($a) and the plain copy ($b) differ (files bytes)"
    if [ "$KEEP" = 1 ]; then log "kept $S"; else rm -rf --one-file-system "$S"; fi
}

# ---- machine ----
meta() { printf '%s\t%s\n' "$1" "$2" >>"$META"; }
cmdline="benches/compare.sh${ORIG_ARGS[*]:+ ${ORIG_ARGS[*]}}"
[ "$LAYBAK" != "$ROOT/target/release/laybak" ] && cmdline="LAYBAK=$LAYBAK $cmdline"
for v in REPS HEAVY_REPS LARGE_SIZE SEED REAL_SRC; do
    if printenv "$v" >/dev/null; then cmdline="$v=${!v} $cmdline"; fi
done
meta command "$cmdline"
meta date "$(date -u +%Y-%m-%dT%H:%MZ)"
meta cpu "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
meta nproc "$(nproc)"
meta ram "$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
meta kernel "$(uname -sr)"
meta fs "$(findmnt -n -o FSTYPE,SOURCE,OPTIONS --target "$WORK" | tr -s ' ')"
meta load_start "$(cut -d' ' -f1-3 /proc/loadavg)"
if [ -n "${LAYBAK_COMMIT:-}" ]; then
    built="built from $LAYBAK_COMMIT"
elif [ "$LAYBAK" = "$ROOT/target/release/laybak" ] && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
    built="built from $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ' + uncommitted changes') (if rebuilt since)"
else
    built="commit unknown: set LAYBAK_COMMIT"
fi
meta laybak "$("$LAYBAK" --version), $built, $LAYBAK"
if git -C "$ROOT" rev-parse --short HEAD >/dev/null 2>&1; then
    meta script_commit "$(git -C "$ROOT" rev-parse --short HEAD)"
fi
meta restic "$(restic version | head -n 1)"
meta borg "$(borg --version)"
meta zstd "$(zstd --version | sed 's/^\*\*\* //; s/ \*\*\*$//; s/, by.*//')"
meta tar "$(tar --version | head -n 1)"
meta python "$(python3 --version)"
meta forget_n "$FORGET_N"
meta restore_depth "$RESTORE_DEPTH"
meta incr_n "$INCR_N"
meta poke "$(human "$POKE_BYTES")"
meta params "REPS=$REPS HEAVY_REPS=$HEAVY_REPS CHANGE_PCT=$CHANGE_PCT FORGET_N=$FORGET_N LARGE_SIZE=$LARGE_SIZE SEED=$SEED SMOKE=$SMOKE SETS=$SETS"
say "machine: $(nproc) cpus, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo), $(uname -r), work $WORK"
say "params: $(tail -n 1 "$META" | cut -f2)"

# ---- run ----
T_START=$EPOCHREALTIME
for SETNAME in "${SET_LIST[@]}"; do
    set_env "$SETNAME"
    make_set
    case $SET in
        small-10k)
            w_initial "$HEAVY_REPS"
            w_change incr "$REPS"
            w_change incr100 "$REPS"
            w_change incrwalk "$REPS"
            w_change nochange "$REPS"
            w_restore "$REPS" latest oldest
            w_forget "$REPS" ;;
        small-100k)
            w_initial "$HEAVY_REPS"
            w_change incr "$REPS"
            w_change incr100 "$REPS"
            w_change incrwalk "$REPS"
            w_change nochange "$REPS"
            w_restore "$HEAVY_REPS" latest oldest ;;
        small-1M)
            w_initial 1
            w_change incr "$HEAVY_REPS"
            w_change incr100 "$HEAVY_REPS"
            w_change nochange "$HEAVY_REPS" ;;
        large)
            w_initial "$HEAVY_REPS"
            w_change copyup "$HEAVY_REPS"
            w_restore "$HEAVY_REPS" latest ;;
        real)
            w_initial "$HEAVY_REPS"
            w_change incr "$REPS"
            w_change nochange "$REPS"
            w_restore "$HEAVY_REPS" latest ;;
    esac
    finish_set
done
meta load_end "$(cut -d' ' -f1-3 /proc/loadavg)"
meta runtime "$(since "$T_START")"
say "done in $(since "$T_START") s"

# ---- report ----
KEEPN=$(( FORGET_N >= 20 ? FORGET_N / 10 : 1 ))
cat >"$WORK/method.md" <<EOF
## Method

Each data set exists twice: \`plain/\`, read by restic, borg and tar, and
\`vol/\`, which laybak attaches. Both get byte-identical changes from
[\`benches/gen_tree.py\`](../benches/gen_tree.py) (seed \`$SEED\`), the laybak
copy through its overlay mount. After the last workload the volume is
detached and checked against the plain copy; in the first rep of every
restore workload laybak's restore of the latest snapshot is compared
(\`diff -r\`) with the source, and every other tool's restore with laybak's.

| workload | laybak | restic 0.14 | borg 1.2 | tar \\| zstd |
|---|---|---|---|---|
| repository | \`laybak init\` | \`restic init\` (format 2, compression auto) | \`borg init -e none\` | a directory of archives |
| initial | \`laybak attach --name SET vol\` | \`restic backup --host bench .\` | \`borg create --compression zstd,3 ::sNNNN .\` | \`tar -g snar -cf - . \\| zstd -T0 -3 -o sNNNN.tar.zst && sync -f\` (level 0) |
| incremental, no-change, copy-up | \`laybak snapshot vol\` | same as initial (parent found automatically) | same as initial (files cache) | same as initial: GNU \`--listed-incremental\`, next level |
| restore | \`laybak restore ID target\` | \`restic restore ID --target T && sync -f T\` | \`borg extract ::sNNNN && sync -f .\` (cwd T) | every level up to the snapshot, \`zstd -dc \\| tar -g /dev/null -xf -\`, then \`sync -f T\` |
| forget | \`laybak forget --keep-last $KEEPN --prune\` | \`restic forget --keep-last $KEEPN --prune\` | \`borg prune --keep-last $KEEPN && borg compact\` | – |

- **incremental**: $CHANGE_PCT% of the regular files are picked (seeded):
  40% overwritten with new content, 30% appended to, 15% deleted, 15% get a
  new sibling file. Each rep changes a new sample and takes one more snapshot,
  so the history grows as it would from cron.
- **incremental, $INCR_N files**: the same, but exactly $INCR_N files on every
  tree size, so the change is constant and only the tree grows.
- **incremental after a walk**: as incremental, and before each tool's
  backup both trees are walked (\`du -s\`, untimed), so every dentry is hot:
  the case where a user just ran \`find\` or \`git status\`.
- **no-change**: a snapshot right after the previous one, nothing changed
  (every tool still records a snapshot).
- **copy-up**: $(human "$POKE_BYTES") of random bytes is written in place at a seeded
  4 KiB-aligned offset inside \`file0.bin\` (half of the big-file set), with
  fsync. In the volume this makes overlayfs copy the whole file up to the
  upper layer; every tool then has to re-read the file (its mtime changed).
  *Growth* is the repository's \`du -sb\` after minus before.
- **restore oldest of $RESTORE_DEPTH**: the history is topped up to at least $RESTORE_DEPTH snapshots
  (untimed, $CHANGE_PCT% changed each); the ${RESTORE_DEPTH}th newest is restored.
- **forget**: the \`small-10k\` history is extended to $FORGET_N snapshots
  ($CHANGE_PCT% changed each), then all but the last $KEEPN are forgotten and
  pruned; every rep runs on a fresh copy of that repository (and its cache).

Timing: wall clock of the command (bash \`EPOCHREALTIME\` around
\`/usr/bin/time -v\`, which gives peak RSS and CPU time), \`sync\` before every
timed command, warm page cache. laybak, restic and borg fsync their
repository writes; tar | zstd gets a \`sync -f\` inside the timed command, and
so does every restore except laybak's, which ends with its own \`syncfs\`.
Peak RSS of a pipeline or \`bash -c\` wrapper is that of its largest
process. The tool order rotates from rep to rep. The ratio in brackets is
the median over reps of *tool time / laybak time* of the same rep; the
chart shows the same ratios (hyperfine is not used because every workload
changes the state the next run starts from). tar stores neither xattrs nor
ACLs by default and cannot forget; its "repository" is its archive chain.
EOF
python3 - "$WORK" "${DOCS:-}" <<'PY'
import collections, html, math, os, statistics, sys

work, docs = sys.argv[1], sys.argv[2]
TOOLS = ["laybak", "restic", "borg", "tar"]
TNAME = {"laybak": "laybak", "restic": "restic", "borg": "borg", "tar": "tar|zstd"}
COLORS = {"restic": "#4c78a8", "borg": "#f58518", "tar": "#54a24b"}
WL = [("initial", "initial backup"), ("incr", "incremental, 1% changed"),
      ("incr100", "incremental, {incr_n} files changed"),
      ("incrwalk", "incremental, 1% changed, tree just walked"),
      ("nochange", "no-change snapshot"), ("copyup", "1 MiB changed in the 1 GiB file"),
      ("restore-latest", "restore latest"), ("restore-oldest", "restore oldest of {depth}"),
      ("forget", "forget all but {keep} of {n} + prune")]

meta = dict(l.rstrip("\n").split("\t", 1) for l in open(f"{work}/meta.tsv"))
_n = int(meta["forget_n"])
WL = [(w, l.format(depth=meta["restore_depth"], n=_n, keep=_n // 10 if _n >= 20 else 1, incr_n=meta["incr_n"])) for w, l in WL]
sets, setorder = {}, []
for l in open(f"{work}/sets.tsv"):
    s, n, b, d = l.rstrip("\n").split("\t")
    sets[s] = (int(n), int(b), d); setorder.append(s)
R = collections.defaultdict(dict)    # (set, wl, tool, metric) -> {rep: value}
for l in open(f"{work}/results.tsv"):
    s, wl, tool, rep, metric, v = l.rstrip("\n").split("\t")
    R[(s, wl, tool, metric)][int(rep)] = float(v)

def med(s, wl, tool, metric="secs"):
    v = R.get((s, wl, tool, metric))
    return statistics.median(v.values()) if v else None

def last(s, wl, tool, metric):
    v = R.get((s, wl, tool, metric))
    return v[max(v)] if v else None

def ratio(s, wl, tool):
    """median over reps of tool/laybak (paired by rep)."""
    a, b = R.get((s, wl, tool, "secs")), R.get((s, wl, "laybak", "secs"))
    if not a or not b:
        return None
    rs = [a[r] / b[r] for r in a if r in b and b[r] > 0]
    return statistics.median(rs) if rs else None

def fsec(x):
    if x is None: return "–"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s" if x < 100 else f"{x:.0f} s"

def fbytes(b):
    if b is None: return "–"
    for u in ["B", "KiB", "MiB", "GiB", "TiB"]:
        if abs(b) < 1024 or u == "TiB":
            return f"{b:.0f} {u}" if u == "B" else f"{b:.1f} {u}"
        b /= 1024

def fratio(r):
    if r is None: return "–"
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×"

rows = []   # (set, wl, label)
for s in setorder:
    for wl, label in WL:
        if any((s, wl, t, "secs") in R for t in TOOLS):
            rows.append((s, wl, label))

def cell(s, wl, t):
    m = med(s, wl, t)
    if m is None:
        return "not yet implemented" if (wl, t) == ("forget", "laybak") else "n/a"
    if t == "laybak":
        return fsec(m)
    return f"{fsec(m)} ({fratio(ratio(s, wl, t))})"

def throughput(s, wl, t):
    m = med(s, wl, t)
    if m is None or wl not in ("initial", "restore-latest", "restore-oldest"):
        return None
    return sets[s][1] / m / 1e6

# ---------- text table on stdout ----------
hdr = ["data set", "workload"] + [TNAME[t] for t in TOOLS]
table = [[s, label] + [cell(s, wl, t) for t in TOOLS] for s, wl, label in rows]
w = [max(len(str(r[i])) for r in table + [hdr]) for i in range(len(hdr))]
print()
print("median wall time; in brackets: time relative to laybak (>1 = laybak faster)")
for r in [hdr, ["-" * x for x in w]] + table:
    print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
print()
print("repository size after all workloads (10k: before/after forget)")
for s in setorder:
    parts = []
    for t in TOOLS:
        b, f = med(s, "size-before-forget", t, "size_b"), med(s, "size-final", t, "size_b")
        parts.append(f"{TNAME[t]} {fbytes(f)}" + (f" (before forget {fbytes(b)})" if b is not None and t in ("restic", "borg") else ""))
    print(f"  {s:11} " + ", ".join(parts))
print()
print("peak RSS (median), per workload")
for s, wl, label in rows:
    print(f"  {s:11} {wl:17} " + ", ".join(
        f"{TNAME[t]} {fbytes((med(s, wl, t, 'rss_kb') or 0) * 1024) if med(s, wl, t, 'rss_kb') else '–'}" for t in TOOLS))

# ---------- targets ----------
def target_rows():
    out = []
    def add(name, ok, detail):
        out.append((name, "met" if ok is True else "NOT met" if ok is False else "not measured", detail))
    ini = [(s, ratio(s, "initial", "restic"), ratio(s, "initial", "tar")) for s in setorder if med(s, "initial", "laybak")]
    add("initial ≥ 1.5× restic throughput", all(r >= 1.5 for _, r, _ in ini) if ini else None,
        ", ".join(f"{s} {fratio(r)}" for s, r, _ in ini))
    add("initial ≥ 70% of tar|zstd throughput", all(r >= 0.7 for _, _, r in ini) if ini else None,
        ", ".join(f"{s} {100 * r:.0f}%" for s, _, r in ini))
    r = ratio("small-100k", "incr", "restic")
    add("incremental (1% of 100k) ≥ 50× faster than restic", None if r is None else r >= 50,
        f"{fratio(r)}" if r else "")
    r = ratio("small-100k", "incrwalk", "restic")
    add("incremental after a walk (1% of 100k, hot dentries) ≥ 50× faster than restic",
        None if r is None else r >= 50, f"{fratio(r)}" if r else "")
    m = med("small-1M", "nochange", "laybak")
    add("no-change snapshot < 100 ms on the 1M tree", None if m is None else m < 0.1,
        fsec(m) if m is not None else "1M tree not in this run (--big); " + ", ".join(
            f"{s} {fsec(med(s, 'nochange', 'laybak'))}" for s in setorder if med(s, "nochange", "laybak")))
    rl = [(s, ratio(s, "restore-latest", "restic")) for s in setorder if med(s, "restore-latest", "laybak")]
    add("restore ≥ 1.5× restic throughput", all(r >= 1.5 for _, r in rl) if rl else None,
        ", ".join(f"{s} {fratio(r)}" for s, r in rl))
    g = med("large", "copyup", "laybak", "growth_b")
    add("copy-up repository growth ≤ 8 MiB for a 1 MiB change", None if g is None else g <= 8 << 20,
        f"{fbytes(g)} (restic {fbytes(med('large', 'copyup', 'restic', 'growth_b'))}, borg {fbytes(med('large', 'copyup', 'borg', 'growth_b'))})" if g is not None else "")
    sz = []
    for s in setorder:
        key = "size-before-forget" if med(s, "size-before-forget", "laybak", "size_b") else "size-final"
        a, b = med(s, key, "laybak", "size_b"), med(s, key, "restic", "size_b")
        if a and b: sz.append((s, a, b))
    add("laybak repository ≤ restic's", all(a <= b for _, a, b in sz) if sz else None,
        ", ".join(f"{s} {fbytes(a)} vs {fbytes(b)}" for s, a, b in sz))
    # RSS bounded by the change: for the same change (no change; exactly
    # INCR_N files) the peak RSS must not grow with the tree (within 25%),
    # and a copy-up snapshot must stay far below the file's size.
    small = [s for s in setorder if s.startswith("small-")]
    nc = [(s, med(s, "nochange", "laybak", "rss_kb")) for s in small if med(s, "nochange", "laybak", "rss_kb")]
    i100 = [(s, med(s, "incr100", "laybak", "rss_kb")) for s in small if med(s, "incr100", "laybak", "rss_kb")]
    inc = [(s, med(s, "incr", "laybak", "rss_kb")) for s in small if med(s, "incr", "laybak", "rss_kb")]
    cu = med("large", "copyup", "laybak", "rss_kb")
    flat = lambda xs: max(v for _, v in xs) <= 1.25 * min(v for _, v in xs)
    ok = None
    if len(nc) >= 2 and len(i100) >= 2:
        ok = flat(nc) and flat(i100)
        if cu is not None:
            ok = ok and cu * 1024 < 0.1 * sets["large"][1] / 2
    add("peak RSS of a snapshot bounded by the change", ok,
        "no change: " + ", ".join(f"{s} {fbytes(v * 1024)}" for s, v in nc) +
        (f"; {meta['incr_n']} files: " + ", ".join(f"{s} {fbytes(v * 1024)}" for s, v in i100) if i100 else "") +
        ("; 1%: " + ", ".join(f"{s} {fbytes(v * 1024)}" for s, v in inc) if inc else "") +
        (f"; copy-up of the {fbytes(sets['large'][1] / 2)} file: {fbytes(cu * 1024)}" if cu else ""))
    return out

targets = target_rows()
print()
print("targets")
for n, st, d in targets:
    print(f"  {st:13} {n}: {d}")

# ---------- SVG ----------
def svg_chart():
    bars = [(s, wl, label) for s, wl, label in rows if wl != "forget" and med(s, wl, "laybak")]
    peers = ["restic", "borg", "tar"]
    vals = [ratio(s, wl, t) for s, wl, _ in bars for t in peers if ratio(s, wl, t)]
    if not vals:
        return None
    lo = 10 ** math.floor(math.log10(min(min(vals), 1) * 0.999))
    hi = 10 ** math.ceil(math.log10(max(max(vals), 1) * 1.001))
    if hi / lo < 100: hi = lo * 100
    W, left, right, top, bh, gap = 900, 250, 70, 80, 11, 10
    H = top + len(bars) * (3 * bh + gap) + 60
    pw = W - left - right
    X = lambda v: left + pw * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">Time relative to laybak (log scale; right of the line = laybak is faster)</text>',
         f'<text x="{W / 2}" y="40" text-anchor="middle" fill="#555">median over reps of the per-rep ratio, all tools in the same run · {html.escape(meta.get("nproc", "?"))} cpus · {html.escape(meta.get("kernel", ""))} · {html.escape(meta.get("date", ""))}</text>']
    lx = left
    for t in peers:
        o.append(f'<rect x="{lx}" y="52" width="12" height="10" fill="{COLORS[t]}"/><text x="{lx + 16}" y="61">{TNAME[t]}</text>')
        lx += 90
    d = lo
    while d <= hi * 1.0001:
        x = X(d)
        o.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{H - 50}" stroke="{"#000" if abs(d - 1) < 1e-9 else "#ddd"}" stroke-width="{2 if abs(d - 1) < 1e-9 else 1}"/>')
        o.append(f'<text x="{x:.1f}" y="{H - 36}" text-anchor="middle">{d:g}×</text>')
        d *= 10
    o.append(f'<text x="{X(1):.1f}" y="{H - 20}" text-anchor="middle" font-weight="bold">laybak = 1×</text>')
    y = top
    for s, wl, label in bars:
        o.append(f'<text x="{left - 8}" y="{y + 1.5 * bh - 2}" text-anchor="end">{html.escape(label)} · {html.escape(s)}</text>')
        o.append(f'<text x="{left - 8}" y="{y + 1.5 * bh + 10}" text-anchor="end" fill="#555" font-size="10">laybak {fsec(med(s, wl, "laybak"))}</text>')
        for i, t in enumerate(peers):
            r = ratio(s, wl, t)
            yy = y + i * bh
            if r:
                x0, x1 = X(min(1, r)), X(max(1, r))
                o.append(f'<rect x="{x0:.1f}" y="{yy}" width="{max(x1 - x0, 1):.1f}" height="{bh - 2}" fill="{COLORS[t]}"/>')
                o.append(f'<text x="{x1 + 3 if r >= 1 else x0 - 3:.1f}" y="{yy + bh - 3}" font-size="9" text-anchor="{"start" if r >= 1 else "end"}">{fratio(r)}</text>')
        y += 3 * bh + gap
    o.append("</svg>")
    return "\n".join(o) + "\n"

svg = svg_chart()

# ---------- Markdown ----------
def md_table(h, rs, left=2, align=None):
    align = align or "l" * left + "r" * (len(h) - left)
    out = ["| " + " | ".join(c.replace("|", "\\|") for c in h) + " |",
           "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rs]
    return "\n".join(out)

md = []
md.append("# Benchmarks: laybak vs restic, borg and tar | zstd\n")
md.append("Generated by [`benches/compare.sh`](../benches/compare.sh); do not edit by hand, "
          "run the script again. Every ratio compares two tools measured in the same run, "
          "interleaved rep by rep, so a busy machine slows both sides.\n")
if svg:
    md.append("![time relative to laybak per workload](benchmarks.svg)\n")
md.append("## Results\n")
md.append("Median wall-clock time. In brackets: the tool's time relative to laybak's "
          "(median of the per-rep ratios; above 1× laybak is faster).\n")
md.append(md_table(["data set", "workload"] + [TNAME[t] for t in TOOLS],
                   [[f"`{s}`", label] + [cell(s, wl, t) for t in TOOLS] for s, wl, label in rows]))
md.append("")
reps = {(s, wl): len(R.get((s, wl, "laybak", "secs"), R.get((s, wl, "restic", "secs"), {}))) for s, wl, _ in rows}
md.append("Repetitions per row: " + ", ".join(f"{s} {wl} {n}" for (s, wl), n in reps.items()) + ".\n")
md.append("### Throughput (tree bytes / time)\n")
trs = []
for s, wl, label in rows:
    if wl in ("initial", "restore-latest", "restore-oldest"):
        trs.append([f"`{s}`", label] + [f"{throughput(s, wl, t):.0f} MB/s" if throughput(s, wl, t) else "–" for t in TOOLS])
md.append(md_table(["data set", "workload"] + [TNAME[t] for t in TOOLS], trs) + "\n")
md.append("### Repository size\n")
md.append("After the initial backup, and after all workloads (for `small-10k` that is "
          "after 100 snapshots, and after forget + prune; tar can only keep all its "
          "archives).\n")
srs = []
for s in setorder:
    srs.append([f"`{s}`", "after initial"] + [fbytes(med(s, "size-initial", t, "size_b")) for t in TOOLS])
    if med(s, "size-before-forget", "laybak", "size_b"):
        srs.append([f"`{s}`", f"after all ({meta['forget_n']} snapshots)"] +
                   [fbytes(med(s, "size-before-forget", t, "size_b")) for t in TOOLS])
        srs.append([f"`{s}`", "after forget + prune"] +
                   [("n/a" if t == "tar" else fbytes(med(s, "size-final", t, "size_b"))) for t in TOOLS])
    else:
        srs.append([f"`{s}`", "after all"] + [fbytes(med(s, "size-final", t, "size_b")) for t in TOOLS])
md.append(md_table(["data set", "when"] + [TNAME[t] for t in TOOLS], srs) + "\n")
cu = [(t, med("large", "copyup", t, "growth_b")) for t in TOOLS]
if any(v is not None for _, v in cu):
    wv, wp = med("large", "copyup", "laybak", "write_s"), med("large", "copyup", "plain", "write_s")
    md.append("### Copy-up\n")
    md.append(f"Repository growth per snapshot after {meta['poke']} overwritten inside the "
              f"{fbytes(sets['large'][1] / 2)} file (median): " +
              ", ".join(f"{TNAME[t]} {fbytes(v)}" for t, v in cu if v is not None) + ".")
    md.append(f"The write itself (pwrite + fsync) took {fsec(wv)} in the laybak volume "
              f"(overlayfs copies the whole file up to the upper layer first) and {fsec(wp)} "
              f"in the plain directory; laybak's local layer store held "
              f"{fbytes(last('large', 'copyup', 'laybak', 'local_b'))} after the last copy-up "
              f"(each copy-up keeps a full copy of the file locally until its layer is folded).\n")
md.append("### Peak RSS (median of `/usr/bin/time -v` maximum resident set size)\n")
md.append(md_table(["data set", "workload"] + [TNAME[t] for t in TOOLS],
                   [[f"`{s}`", label] + [("–" if med(s, wl, t, "rss_kb") is None
                                          else fbytes(med(s, wl, t, "rss_kb") * 1024)) for t in TOOLS] for s, wl, label in rows]) + "\n")
md.append("### CPU time (user + system, median)\n")
md.append(md_table(["data set", "workload"] + [TNAME[t] for t in TOOLS],
                   [[f"`{s}`", label] + [("–" if med(s, wl, t, "cpu_s") is None else f"{med(s, wl, t, 'cpu_s'):.2f} s") for t in TOOLS] for s, wl, label in rows]) + "\n")
maxrep = max((len(R.get((s, wl, t, "secs"), {})) for s, wl, _ in rows for t in TOOLS), default=0)
raw = []
for s, wl, label in rows:
    for t in TOOLS:
        v = R.get((s, wl, t, "secs"))
        if v:
            raw.append([f"`{s}`", label, TNAME[t]] + [f"{v[r]:.3f}" if r in v else "" for r in range(1, maxrep + 1)])
md.append("<details><summary>Every rep (seconds)</summary>\n")
md.append(md_table(["data set", "workload", "tool"] + [f"rep {r}" for r in range(1, maxrep + 1)], raw, left=3))
md.append("\n</details>\n")
md.append("### Targets\n")
md.append(md_table(["target", "status", "measured"], [[n, st, d] for n, st, d in targets], left=3) + "\n")
md.append("## Data sets\n")
md.append(md_table(["set", "files", "bytes", "what"], [[f"`{s}`", f"{sets[s][0]:,}", fbytes(sets[s][1]), sets[s][2]] for s in setorder], align="lrrl") + "\n")
md.append("## Machine and command\n")
md.append("```sh\n" + meta["command"] + "\n```\n")
for k in ["date", "cpu", "nproc", "ram", "kernel", "fs", "load_start", "load_end", "runtime", "laybak", "script_commit", "restic", "borg", "zstd", "tar", "python", "params"]:
    if k in meta:
        v = meta[k] + (" s" if k == "runtime" else "")
        md.append(f"- **{k}**: {v}")
md.append("")
md.append(open(f"{work}/method.md").read())

if docs:
    os.makedirs(docs, exist_ok=True)
    with open(os.path.join(docs, "BENCHMARKS.md"), "w") as f:
        f.write("\n".join(md))
    if svg:
        with open(os.path.join(docs, "benchmarks.svg"), "w") as f:
            f.write(svg)
    print(f"\nwrote {docs}/BENCHMARKS.md" + (f" and {docs}/benchmarks.svg" if svg else ""))
PY

#!/usr/bin/env bash
# laybak on S3 next to restic on S3, same Garage cluster, same data, one run:
#   initial   first backup of the tree (laybak: attach)
#   incr      backup after 1% of the files changed
#   restore   restore of the latest snapshot into an empty directory
# and laybak's restore from a local repository of the same tree, for the
# remote/local ratio. Prints a markdown table; ratios are other/laybak-s3.
#
# Usage: benches/s3.sh [--smoke] [--files N] [--env FILE] [--work DIR]
#   --smoke      2,000 files (CI), otherwise 20,000 (--files N to change)
#   --env FILE   an env file of .ci/s3_up.sh (AWS_ENDPOINT_URL, keys,
#                AWS_REGION, LAYBAK_TEST_BUCKET); without it a 3-node
#                cluster is started in the work dir with $GARAGE
# Env:   LAYBAK (target/release/laybak), GARAGE (~/.cache/laybak-ci/garage/bin/garage)
# Needs: root, python3, restic (apt-get install restic).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAYBAK=${LAYBAK:-$ROOT/target/release/laybak}
GEN=$ROOT/benches/gen_tree.py
FILES=20000
ENVFILE=""
WORK=""
while [ $# -gt 0 ]; do
    case $1 in
        --smoke) FILES=2000 ;;
        --files) FILES=$2; shift ;;
        --env) ENVFILE=$2; shift ;;
        --work) WORK=$2; shift ;;
        *) echo "benches/s3.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[ "$(id -u)" = 0 ] || { echo "benches/s3.sh: run as root (laybak mounts overlayfs)" >&2; exit 1; }
command -v restic >/dev/null || { echo "benches/s3.sh: needs restic (apt-get install restic)" >&2; exit 1; }
WORK=${WORK:-$(mktemp -d /var/tmp/lb-s3bench.XXXXXX)}
mkdir -p "$WORK"
cleanup() {
    for v in "$WORK"/vol-s3 "$WORK"/vol-local; do
        [ -d "$v" ] && LAYBAK_STATE_DIR=$WORK/state "$LAYBAK" detach "$v" >/dev/null 2>&1 || true
    done
    for p in "$WORK"/stores/garage/n*/pid; do [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
if [ -z "$ENVFILE" ]; then
    export GARAGE=${GARAGE:-$HOME/.cache/laybak-ci/garage/bin/garage}
    ENVFILE=$("$ROOT/.ci/s3_up.sh" "$WORK/stores" garage)
fi
set -a; . "$ENVFILE"; set +a
TAG=bench-$$-$(date +%s)
export LAYBAK_STATE_DIR=$WORK/state
export RESTIC_PASSWORD=bench LAYBAK_PASSWORD=bench AWS_DEFAULT_REGION=$AWS_REGION
S3REPO=s3://$LAYBAK_TEST_BUCKET/$TAG
RESTIC_REPO=s3:$AWS_ENDPOINT_URL/$LAYBAK_TEST_BUCKET/$TAG-restic

now() { date +%s.%N; }
t() { local s; s=$(now); "$@" >/dev/null; awk -v a="$s" -v b="$(now)" 'BEGIN{printf "%.3f", b-a}'; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }

echo "== data: $FILES files" >&2
python3 "$GEN" small "$WORK/vol-s3" "$FILES" 1 >/dev/null
cp -a "$WORK/vol-s3" "$WORK/vol-local"
cp -a "$WORK/vol-s3" "$WORK/restic-src"
BYTES=$(du -sb "$WORK/vol-s3" | cut -f1)

"$LAYBAK" init --repo "$S3REPO" 2>/dev/null
"$LAYBAK" init --repo "$WORK/repo-local" 2>/dev/null
restic -r "$RESTIC_REPO" init >/dev/null 2>&1

drop; i_s3=$(t "$LAYBAK" attach --repo "$S3REPO" "$WORK/vol-s3")
drop; i_local=$(t "$LAYBAK" attach --repo "$WORK/repo-local" "$WORK/vol-local")
drop; i_restic=$(t restic -r "$RESTIC_REPO" backup -q "$WORK/restic-src")

python3 "$GEN" mutate incr 1 1 "$WORK/vol-s3" "$WORK/vol-local" "$WORK/restic-src" >/dev/null
drop; n_s3=$(t "$LAYBAK" snapshot "$WORK/vol-s3")
drop; n_local=$(t "$LAYBAK" snapshot "$WORK/vol-local")
drop; n_restic=$(t restic -r "$RESTIC_REPO" backup -q "$WORK/restic-src")

drop; r_s3=$(t "$LAYBAK" --repo "$S3REPO" restore latest --volume vol-s3 "$WORK/r-s3")
drop; r_local=$(t "$LAYBAK" --repo "$WORK/repo-local" restore latest --volume vol-local "$WORK/r-local")
drop; r_restic=$(t restic -r "$RESTIC_REPO" restore latest --target "$WORK/r-restic")

# The restores are what was backed up.
diff -r "$WORK/vol-s3" "$WORK/r-s3" >/dev/null || { echo "benches/s3.sh: laybak S3 restore differs" >&2; exit 1; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.1f×", a/b; else print "-" }'; }
cat <<EOF
### laybak on S3 next to restic on S3 (Garage 2.5, 3 nodes on loopback)

$FILES files, $BYTES bytes; one run on $(nproc) cores, $(date -u +%Y-%m-%d); page cache dropped before each step.

| step | laybak s3 (s) | restic s3 (s) | restic / laybak | laybak local (s) | s3 / local |
|---|---:|---:|---:|---:|---:|
| initial | $i_s3 | $i_restic | $(ratio "$i_restic" "$i_s3") | $i_local | $(ratio "$i_s3" "$i_local") |
| incr (1%) | $n_s3 | $n_restic | $(ratio "$n_restic" "$n_s3") | $n_local | $(ratio "$n_s3" "$n_local") |
| restore | $r_s3 | $r_restic | $(ratio "$r_restic" "$r_s3") | $r_local | $(ratio "$r_s3" "$r_local") |
EOF

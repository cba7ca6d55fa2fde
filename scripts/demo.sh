#!/usr/bin/env bash
# laybak's main job, end to end, on a local repository in a scratch dir:
# attach a directory, change it, snapshot, list, diff, restore from the
# repository alone, mount an old snapshot read-only, verify, detach.
# Run as root (laybak mounts overlayfs). Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (laybak mounts overlayfs)" >&2; exit 1; }
cargo build --release --quiet
LB=$PWD/target/release/laybak
W=$(mktemp -d /tmp/laybak-demo.XXXXXX)
export LAYBAK_REPO=$W/repo LAYBAK_STATE_DIR=$W/state
# The repository is encrypted; cron and systemd read its password from a
# root-only file (never from the command line).
(umask 077; echo "demo password $$" > "$W/password")
export LAYBAK_PASSWORD_FILE=$W/password
cleanup() {
    "$LB" umount "$W/then" 2>/dev/null || true
    "$LB" detach "$W/data" 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "a directory with some data"
mkdir -p "$W/data/docs" "$W/data/src"
for i in $(seq 1 200); do printf 'file %s\n%s\n' "$i" "$(seq 1 $i)" > "$W/data/src/f$i.txt"; done
cp -r /usr/share/common-licenses "$W/data/docs/" 2>/dev/null || echo "license text" > "$W/data/docs/LICENSE"
head -c 3000000 /dev/urandom > "$W/data/blob.bin"
ln -s src/f1.txt "$W/data/first"
du -sh "$W/data"

step "laybak init (encrypted) && laybak attach (the contents become the first snapshot)"
"$LB" init
"$LB" key list
FIRST=$("$LB" attach "$W/data" --tag initial)
echo "first snapshot: $FIRST"
findmnt -n -o FSTYPE,SOURCE "$W/data"

step "users work as before"
echo "changed" >> "$W/data/src/f7.txt"
rm "$W/data/src/f8.txt"
rm -r "$W/data/docs"; mkdir "$W/data/docs"; echo "new docs" > "$W/data/docs/README"
printf 'new file\n' > "$W/data/new.txt"
dd if=/dev/urandom of="$W/data/blob.bin" bs=4096 count=1 seek=100 conv=notrunc status=none
"$LB" status "$W/data"

step "laybak snapshot (what cron runs)"
SECOND=$("$LB" snapshot "$W/data" --tag hourly)
echo "second snapshot: $SECOND"
"$LB" snapshots
"$LB" diff "$FIRST" "$SECOND"

step "restore the latest snapshot from the repository alone"
cp -a "$W/data" "$W/expected"
LAYBAK_STATE_DIR=$W/empty-state "$LB" restore latest "$W/restored"
diff -r --no-dereference "$W/expected" "$W/restored" && echo "restored tree is identical"

step "mount the first snapshot read-only"
"$LB" mount "$FIRST" "$W/then"
ls "$W/then" "$W/then/docs" | head
cat "$W/then/src/f8.txt" | head -1
"$LB" umount "$W/then"

step "verify every byte in the repository"
"$LB" check --read-data

step "detach: a plain directory again"
"$LB" detach "$W/data"
diff -r --no-dereference "$W/expected" "$W/data" && echo "detached directory is identical"
echo
echo "demo OK"

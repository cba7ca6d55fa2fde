#!/usr/bin/env bash
# The test suite with everything it needs, on a fresh machine (as root):
# installs the Debian packages the tests use, builds Garage once (cached in
# $LAYBAK_CI_TOOLS, default ~/.cache/laybak-ci), starts a 3-node Garage
# cluster, a second one for the fault test and Ceph RGW on loopback, runs
# `cargo nextest run "$@"`, and stops the stores again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: run it as root (the tests mount overlayfs and start servers)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
need=()
for p in python3 python3-venv python3-pip git sqlite3 passwd util-linux attr strace e2fsprogs ceph-mon ceph-osd radosgw uuid-runtime curl openssl; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
# npm may come with a nodejs that is not Debian's: only install it if absent.
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
    echo "== install ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
TOOLS=${LAYBAK_CI_TOOLS:-$HOME/.cache/laybak-ci}
mkdir -p "$TOOLS"
if [ ! -x "$TOOLS/garage/bin/garage" ]; then
    echo "== build Garage 2.5.0 once (about 3 minutes; cached in $TOOLS)"
    cargo install --quiet --locked --debug --no-default-features \
        --features bundled-libs,sqlite --root "$TOOLS/garage" garage@2.5.0
fi
stop_stores() {
    for p in "$TOOLS"/run/garage*/n*/pid "$TOOLS"/run/ceph/run/*.pid; do
        [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null || true
    done
}
stop_stores
trap stop_stores EXIT
echo "== start S3 stores: Garage (3 nodes), Garage for the fault test, Ceph RGW"
export GARAGE="$TOOLS/garage/bin/garage"
envs=$(.ci/s3_up.sh "$TOOLS/run" garage ceph)
envs=$envs:$(GARAGE_PORTS=49 GARAGE_NAME=garage-faults .ci/s3_up.sh "$TOOLS/run" garage)
export LAYBAK_TEST_S3=$envs
echo "== cargo nextest run $*"
cargo nextest run "$@"

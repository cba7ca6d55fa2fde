#!/usr/bin/env bash
# Start the S3 stores the tests use, on loopback, and write one env file per
# store (AWS_ENDPOINT_URL, keys, region, LAYBAK_TEST_BUCKET, and how to stop
# or restart its nodes). Prints the env files, colon-separated, for
# LAYBAK_TEST_S3.
#
#   .ci/s3_up.sh DIR            # Garage (3 nodes) and Ceph RGW
#   .ci/s3_up.sh DIR garage     # one of them
#   GARAGE_PORTS=49 GARAGE_NAME=garage-faults .ci/s3_up.sh DIR garage
#                               # a second cluster (ports 49i0..49i3) for
#                               # the test that stops its nodes
#
# Garage comes from GARAGE (default: DIR/../garage/bin/garage, built by
# .ci/run and cached); Ceph from Debian's ceph-mon, ceph-osd and radosgw.
set -euo pipefail
D=$(realpath -m "${1:?usage: s3_up.sh DIR [garage|ceph]...}"); shift
WHICH=${*:-garage ceph}
mkdir -p "$D"
envs=()

garage_up() {
    local G=${GARAGE:-$(dirname "$D")/garage/bin/garage}
    local P=${GARAGE_PORTS:-39} NAME=${GARAGE_NAME:-garage}
    local B=$D/$NAME secret
    for pid in "$B"/n*/pid; do [ -f "$pid" ] && kill -9 "$(cat "$pid")" 2>/dev/null || true; done
    sleep 0.2
    rm -rf "$B"; mkdir -p "$B"
    secret=$(openssl rand -hex 32)
    for i in 1 2 3; do
        local n=$B/n$i; mkdir -p "$n"
        cat > "$n/garage.toml" <<TOML
metadata_dir = "$n/meta"
data_dir = "$n/data"
db_engine = "sqlite"
replication_factor = 3
consistency_mode = "consistent"
rpc_bind_addr = "127.0.0.1:${P}${i}1"
rpc_public_addr = "127.0.0.1:${P}${i}1"
rpc_secret = "$secret"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:${P}${i}0"
TOML
        # Restartable by the tests: NODE_i_START / NODE_i_PID below.
        cat > "$n/start.sh" <<SH
#!/bin/sh
cd "$n" && NO_COLOR=1 RUST_LOG=garage=warn nohup "$G" -c "$n/garage.toml" server >> "$n/server.log" 2>&1 &
echo \$! > "$n/pid"
SH
        chmod +x "$n/start.sh"; "$n/start.sh"
    done
    for i in 1 2 3; do
        for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/${P}${i}1) 2>/dev/null && break; sleep 0.1; done
    done
    g() { "$G" -c "$B/n1/garage.toml" "$@"; }
    local ids=()
    for i in 1 2 3; do ids+=("$("$G" -c "$B/n$i/garage.toml" node id -q 2>/dev/null)"); done
    g node connect "${ids[1]}" >/dev/null
    g node connect "${ids[2]}" >/dev/null
    for i in 0 1 2; do g layout assign -z "dc$((i+1))" -c 1G "${ids[$i]%@*}" >/dev/null; done
    g layout apply --version 1 >/dev/null
    local key; key=$(g key create laybak-key)
    g bucket create laybak >/dev/null
    g bucket allow --read --write --owner laybak --key laybak-key >/dev/null
    local kid ksec
    kid=$(sed -n 's/^Key ID: *//p' <<<"$key" | head -1)
    ksec=$(sed -n 's/^Secret key: *//p' <<<"$key" | head -1)
    [ -n "$kid" ] && [ -n "$ksec" ] || { echo "garage: no key in: $key" >&2; exit 1; }
    cat > "$B/env" <<ENV
LAYBAK_TEST_STORE=$NAME
AWS_ENDPOINT_URL=http://127.0.0.1:${P}10
AWS_ACCESS_KEY_ID=$kid
AWS_SECRET_ACCESS_KEY=$ksec
AWS_REGION=garage
LAYBAK_TEST_BUCKET=laybak
LAYBAK_TEST_NODES=$B/n1:$B/n2:$B/n3
ENV
    # The cluster answers once every node has the layout.
    for _ in $(seq 1 100); do
        curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${P}10/" | grep -q 403 && break
        sleep 0.1
    done
    envs+=("$B/env")
}

ceph_up() {
    local C=$D/ceph
    for pid in "$C"/run/*.pid; do [ -f "$pid" ] && kill -9 "$(cat "$pid")" 2>/dev/null || true; done
    sleep 0.5
    rm -rf "$C"; mkdir -p "$C"/{run,log,mon}
    local fsid; fsid=$(uuidgen)
    cat > "$C/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:6789
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon warn on pool no redundancy = false
mon data avail warn = 5
run dir = $C/run
log file = $C/log/\$name.log
admin socket = $C/run/\$name.asok
pid file = $C/run/\$name.pid
mon data = $C/mon/\$cluster-\$id
osd data = $C/osd/\$cluster-\$id
osd objectstore = bluestore
bluestore block create = true
bluestore block size = 4294967296
bluestore fsck on mkfs = false
osd memory target = 536870912
bluestore cache autotune = false
bluestore cache size = 134217728
[client.rgw.x]
rgw frontends = beast endpoint=127.0.0.1:7480
rgw data = $C/rgw
log file = $C/log/rgw.log
CONF
    local c="-c $C/ceph.conf"
    monmaptool --create --addv a '[v1:127.0.0.1:6789]' --fsid "$fsid" "$C/monmap" >/dev/null
    ceph-authtool --create-keyring "$C/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-mon $c --mkfs -i a --monmap "$C/monmap" --keyring "$C/mon.keyring"
    ceph-mon $c -i a
    local u id; u=$(uuidgen); id=$(timeout 60 ceph $c osd new "$u"); mkdir -p "$C/osd/ceph-$id"
    ceph-osd $c -i "$id" --mkfs --osd-uuid "$u" 2>/dev/null
    ceph-osd $c -i "$id" 2>/dev/null
    radosgw $c -n client.rgw.x
    for _ in $(seq 1 300); do curl -s -o /dev/null http://127.0.0.1:7480/ && break; sleep 0.2; done
    timeout 120 radosgw-admin $c user create --uid=laybak --display-name=laybak \
        --access-key=AKCEPHLAYBAK --secret-key=SKCEPHLAYBAKSECRET >/dev/null
    cat > "$C/env" <<ENV
LAYBAK_TEST_STORE=ceph
AWS_ENDPOINT_URL=http://127.0.0.1:7480
AWS_ACCESS_KEY_ID=AKCEPHLAYBAK
AWS_SECRET_ACCESS_KEY=SKCEPHLAYBAKSECRET
AWS_REGION=us-east-1
LAYBAK_TEST_BUCKET=laybak
LAYBAK_TEST_CREATE_BUCKET=1
ENV
    envs+=("$C/env")
}

for w in $WHICH; do "${w}_up" >&2; done
(IFS=:; echo "${envs[*]}")

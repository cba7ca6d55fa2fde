#!/usr/bin/env bash
# Regenerate fuzz/seeds/ from the v1 fixture repository. Run by hand when
# tests/fixtures/repo-v1 changes (needs the zstd command-line tool);
# the result is small and committed.
#   seeds/<kind>/            the fixture files as they are on disk
#   seeds/<kind>_postcard/   their postcard payloads (header and zstd removed)
#   seeds/pack_framed/       packs in pack_framed's input form
#   seeds/restack_chain/     the fixture layers as one postcard Vec<Layer>
#   seeds/plan_lock_postcard/  a hand-made forget plan and lock payload
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fix="$here/../tests/fixtures/repo-v1"
seeds="$here/seeds"
rm -rf "$seeds"
mkdir -p "$seeds"/{config,index,layer,snapshot,pack}{,_postcard} "$seeds"/{pack_framed,restack_chain,plan_lock_postcard}
rmdir "$seeds/pack_postcard"

cp "$fix/config" "$seeds/config/"
cp "$fix"/index/* "$seeds/index/"
cp "$fix"/layers/* "$seeds/layer/"
cp "$fix"/snapshots/* "$seeds/snapshot/"
cp "$fix"/packs/*/* "$seeds/pack/"

for kind in config index layer snapshot; do
    for f in "$seeds/$kind"/*; do
        out="$seeds/${kind}_postcard/$(basename "$f")"
        # Snapshot records are sealed: a 32-byte blake3 precedes the frame.
        tail -c +9 "$f" | zstd -d -q -c >"$out" 2>/dev/null ||
            tail -c +41 "$f" | zstd -d -q -c >"$out"
    done
done

# pack_framed input: u16 LE table length, then the pack without its header,
# length field and trailer magic.
for f in "$seeds"/pack/*; do
    n=$(stat -c %s "$f")
    tl=$(tail -c 12 "$f" | head -c 4 | od -An -tu4 | tr -d ' ')
    {
        printf "$(printf '\\x%02x\\x%02x' $((tl & 255)) $((tl >> 8 & 255)))"
        tail -c +9 "$f" | head -c $((n - 8 - 12))
    } >"$seeds/pack_framed/$(basename "$f")"
done

# restack_chain input: a postcard Vec<Layer> (count, then each layer, which
# encodes like Vec<Entry>). Both orders of the two fixture layers.
layers=("$seeds"/layer_postcard/*)
cat <(printf '\x02') "${layers[0]}" "${layers[1]}" >"$seeds/restack_chain/ab"
cat <(printf '\x02') "${layers[1]}" "${layers[0]}" >"$seeds/restack_chain/ba"
cat <(printf '\x01') "${layers[0]}" >"$seeds/restack_chain/a"
# Plan { rewrite: [(id, [id])], delete: [id] } and LockInfo { host: "h",
# pid: 1, time: { secs: 1, nanos: 0 }, exclusive: true, what: "snapshot" }.
id=$(printf '\\x%02x' $(seq 1 32))
printf "\x01${id}\x01${id}\x01${id}" >"$seeds/plan_lock_postcard/plan"
printf '\x01h\x01\x02\x00\x01\x08snapshot' >"$seeds/plan_lock_postcard/lock"
# retention: Policy { last: 1, hourly: 2, daily: 1, within: 1 h, tags:
# ["keep"] } and three snapshots, the middle one tagged "keep".
mkdir -p "$seeds/retention"
printf '\x01\x02\x01\x00\x00\x00\x01\x90\x1c\x01\x04\x6b\x65\x65\x70\x03\x80\xc4\x9f\xd5\x0c\x00\x00\xa0\xfc\x9f\xd5\x0c\x00\x01\x04\x6b\x65\x65\x70\xa0\xc2\xaa\xd5\x0c\x00\x00' >"$seeds/retention/policy"
find "$seeds" -type f | sort | sed "s|$here/||"

# The v2 fixture (a layer with renamed directories): its layers, their
# payloads, and the two as a chain (base first).
fix2="$here/../tests/fixtures/repo-v2"
chain2=()
for f in "$fix2"/layers/*; do
    n="v2-$(basename "$f")"
    cp "$f" "$seeds/layer/$n"
    tail -c +9 "$f" | zstd -d -q -c >"$seeds/layer_postcard/$n"
    if [ "$(od -An -tx1 -j7 -N1 "$f" | tr -d ' ')" = 01 ]; then
        chain2=("$seeds/layer_postcard/$n" "${chain2[@]}")
    else
        chain2+=("$seeds/layer_postcard/$n")
    fi
done
{ printf '\x02'; cat "${chain2[@]}"; } >"$seeds/restack_chain/v2-renamed"
mkdir -p "$seeds/repo_layer" && cp "$seeds"/layer/* "$seeds/repo_layer/"

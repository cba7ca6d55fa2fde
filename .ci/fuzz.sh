#!/usr/bin/env bash
# Fuzz smoke run: build every cargo-fuzz target in fuzz/ and run each for a
# few seconds, starting from the committed seeds (fuzz/seeds/<target>/) and
# replaying saved crash inputs (fuzz/regressions/<target>/). Exits non-zero
# if any target crashes, panics, leaks, runs out of memory or times out.
#
#   .ci/fuzz.sh                 all targets, FUZZ_TIME seconds each (10)
#   .ci/fuzz.sh layer pack      only these targets
#   FUZZ_TIME=120 .ci/fuzz.sh   longer runs
#
# Only stable Rust is installed: cargo-fuzz needs nightly flags
# (-Zsanitizer=address), so RUSTC_BOOTSTRAP=1 unlocks them on stable.
# Everything builds in fuzz/target and the growing corpus stays in
# fuzz/corpus (both git-ignored); crash inputs land in fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR=never
export RUSTC_BOOTSTRAP=1
FUZZ_TIME="${FUZZ_TIME:-10}"
start=$SECONDS

echo "== fuzz: tools"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
cargo fuzz --version
if ! command -v c++ >/dev/null 2>&1; then
    # libfuzzer-sys compiles libFuzzer from C++ source.
    echo "fuzz.sh: a C++ compiler is needed (apt-get install g++)" >&2
    exit 1
fi

echo "== fuzz: build"
# Not --locked: fuzz/Cargo.lock pins what it has, and a dependency laybak
# gains is added to it rather than failing the run.
cargo fuzz build
# The targets are run directly, not through `cargo fuzz run`, so that each
# run uses this build (cargo fuzz run would rebuild if src/ changed).
bin="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"
build_done=$SECONDS

echo "== fuzz: the committed seeds still decode"
# A format change that leaves fuzz/seeds stale would silently start every
# fuzzer from nothing; regenerate them with fuzz/update-seeds.sh.
cargo test --quiet --manifest-path fuzz/Cargo.toml --lib

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# The lines of a libFuzzer log that say what went wrong and where the input is.
summarize() {
    awk '/panicked at/ { print "    " $0; getline; print "    " $0; next }
         /^==[0-9]+== ERROR|^SUMMARY|^Running: |Test unit written to/ { print "    " $0 }' "$1" |
        head -n 20
    echo "    (full log: $1)"
}

logs=fuzz/target/logs
mkdir -p "$logs"
passed=0
failed=()
# -timeout: one input taking over 10 s is a hang. -rss_limit_mb (also the
# largest single allocation allowed): libFuzzer's default, 2 GiB.
limits=(-timeout=10 -rss_limit_mb=2048)
for t in "${targets[@]}"; do
    t0=$SECONDS
    ok=1
    mkdir -p "fuzz/artifacts/$t"
    # Saved crash inputs are replayed one by one (not used as corpus, so a
    # large one does not raise the fuzzer's input size limit).
    if compgen -G "fuzz/regressions/$t/*" >/dev/null; then
        if ! "$bin/$t" "${limits[@]}" fuzz/regressions/"$t"/* >"$logs/$t.regressions.log" 2>&1; then
            echo "fuzz $t: a saved input in fuzz/regressions/$t still fails:"
            summarize "$logs/$t.regressions.log"
            ok=0
        fi
    fi
    corpus="fuzz/corpus/$t"
    mkdir -p "$corpus"
    if [ -d "fuzz/seeds/$t" ]; then
        cp -n fuzz/seeds/"$t"/* "$corpus"/ 2>/dev/null || true
    fi
    if "$bin/$t" -artifact_prefix="fuzz/artifacts/$t/" -max_total_time="$FUZZ_TIME" \
        "${limits[@]}" -print_final_stats=1 "$corpus" >"$logs/$t.log" 2>&1; then
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log")
        echo "fuzz $t: fuzzed ${execs:-?} inputs in $((SECONDS - t0)) s, no crash"
    else
        echo "fuzz $t: CRASH after $((SECONDS - t0)) s:"
        summarize "$logs/$t.log"
        ok=0
    fi
    if [ $ok = 1 ]; then
        passed=$((passed + 1))
    else
        failed+=("$t")
    fi
done

echo "== fuzz: build $((build_done - start)) s, total $((SECONDS - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failing targets: ${failed[*]}"
fi
echo "fuzz: ${passed} passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]

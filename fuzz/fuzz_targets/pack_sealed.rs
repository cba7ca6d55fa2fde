#![no_main]
//! Version 3 packs: fuzzed and properly sealed tables, then every blob.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_sealed_pack(data));

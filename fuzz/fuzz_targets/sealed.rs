#![no_main]
//! Version 3 metadata files: authentication refuses fuzzed bytes, and payloads the harness seals reach the decoders.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_sealed(data));

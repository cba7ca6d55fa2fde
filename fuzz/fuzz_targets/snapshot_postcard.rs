#![no_main]
//! Raw postcard payloads of `snapshot` records, framed as a plain metadata
//! file and as a sealed record before decoding.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_snapshot_payload(data));

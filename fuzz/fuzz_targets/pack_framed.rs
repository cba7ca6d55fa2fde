#![no_main]
//! Pack files whose trailer framing (length + magic) is always well formed,
//! so the fuzzer spends its time on the postcard table and the blobs.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_pack(&laybak_fuzz::frame_pack(data)));

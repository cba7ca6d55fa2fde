#![no_main]
//! Key files (`keys/ID`): parsing, parameter bounds, unwrapping with a wrong password.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_key_file(data));

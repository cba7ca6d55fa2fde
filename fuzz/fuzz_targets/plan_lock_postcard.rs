#![no_main]
//! Raw postcard payloads read as a forget plan and as a lock file.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_plan_lock_payload(data));

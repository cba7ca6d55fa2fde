#![no_main]
//! Whole `snapshot` files, as read from a repository.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_snapshot(data));

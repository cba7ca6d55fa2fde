#![no_main]
//! `reclaim::keep` (forget's retention policy) on arbitrary snapshot times
//! and tags, checked against what each rule promises.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_retention(data));

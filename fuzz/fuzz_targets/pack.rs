#![no_main]
//! Whole pack files: trailer parsing and blob decoding.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_pack(data));

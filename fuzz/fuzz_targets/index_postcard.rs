#![no_main]
//! Raw postcard payloads of `index` files, framed (header + zstd) before decoding.
use laybak::format::FileKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_index(&laybak_fuzz::wrap(FileKind::Index, data)));

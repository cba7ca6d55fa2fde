#![no_main]
//! Raw postcard payloads of `config` files, framed (header + zstd) before decoding.
use laybak::format::FileKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_config(&laybak_fuzz::wrap(FileKind::Config, data)));

#![no_main]
//! A chain of layer manifests (postcard `Vec<Layer>`, at most 8 layers): the
//! valid ones are restacked and the result checked against the invariants
//! FORMAT.md §5 promises.
use laybak::layer::Layer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((layers, _)) = postcard::take_from_bytes::<Vec<Layer>>(data) {
        if layers.len() <= 8 {
            laybak_fuzz::check_chain(&layers);
        }
    }
});

#![no_main]
//! A layer manifest file (header included) stored in an in-memory
//! repository (`backend::testing::Memory`) and read back through the
//! repository's one door (`Repo::read_layer`: verified id, checked header
//! and version, decoded, validated); what it accepts is restacked and
//! squashed with the checks of `restack_chain`.
use laybak::backend::testing::Memory;
use laybak::format::{FileKind, LayerId};
use laybak::repo::Repo;
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let repo = Repo::create(
        Path::new("memory"),
        Arc::new(Memory::new()),
        &laybak::repo::Protection::Plaintext,
    )
    .expect("memory repo");
    let id = LayerId(
        repo.write_file(FileKind::Layer, data.to_vec())
            .expect("memory write"),
    );
    if let Ok(layer) = repo.read_layer(&id) {
        laybak_fuzz::check_chain(std::slice::from_ref(&layer));
    }
});

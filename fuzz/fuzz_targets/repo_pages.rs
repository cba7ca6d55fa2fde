#![no_main]
//! Paged layer manifests (format version 4) read through the repository:
//! the list of pages, each page blob, and the checks between them.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| laybak_fuzz::check_repo_pages(data));

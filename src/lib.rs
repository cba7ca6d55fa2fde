//! laybak: layered backups on OverlayFS.
//!
//! A volume is an overlay mount whose upperdir takes every change; a
//! snapshot seals the upperdir as a layer, remounts on a fresh one, and
//! archives the sealed layer into a content-addressed repository. Any
//! snapshot can be restacked from the repository alone.
//!
//! Three flows: capture ([`volume`] → [`scan`] → [`repo`]), restack
//! ([`layer::restack`] → [`materialize`] / [`overlay`]), and (later)
//! reclaim. See `docs/DESIGN.md` and `docs/FORMAT.md`.

pub mod archive;
pub mod backend;
pub mod blobcache;
pub mod check;
pub mod cli;
pub mod crypt;
pub mod error;
pub mod failpoint;
pub mod fold;
pub mod format;
pub mod fsx;
pub mod hooks;
pub mod layer;
pub mod lock;
pub mod materialize;
pub mod mounts;
pub mod overlay;
pub mod ovl;
pub mod password;
pub mod progress;
pub mod reclaim;
pub mod repo;
pub mod scan;
pub mod spill;
pub mod stack;
pub mod volume;

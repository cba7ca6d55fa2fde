//! Repository verification: structure always, every byte with `--read-data`.

use crate::format::{BlobId, LayerId, PackId, SnapshotId};
use crate::layer::Node;
use crate::repo::{self, Repo};
use anyhow::Result;
use std::collections::{BTreeSet, HashMap, HashSet};

/// What `check` found.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Snapshots checked.
    pub snapshots: usize,
    /// Distinct layer manifests checked.
    pub layers: usize,
    /// Packs known to the index.
    pub packs: usize,
    /// Bytes of pack data read and verified (with `--read-data`).
    pub bytes_read: u64,
    /// Problems, one line each.
    pub errors: Vec<String>,
    /// Snapshots (hex ids) that cannot be fully restored.
    pub damaged_snapshots: Vec<String>,
    /// Notes that are not damage (e.g. packs written by an interrupted run).
    pub notes: Vec<String>,
}

/// Check the repository. With `read_data`, read every pack and verify every
/// blob's blake3.
///
/// # Errors
/// Only when the repository cannot be listed at all; damage is reported in
/// the [`Report`].
pub fn check(repo: &Repo, read_data: bool, progress: bool) -> Result<Report> {
    let mut r = Report::default();
    // Indexes.
    let mut blobs: HashMap<BlobId, repo::BlobLoc> = HashMap::new();
    let mut packs: HashMap<PackId, u64> = HashMap::new();
    for id in repo.index_ids()? {
        match repo.read_index(&id) {
            Ok(ps) => {
                for p in ps {
                    packs.insert(p.id, p.size);
                    for b in p.blobs {
                        blobs.insert(
                            b.id,
                            repo::BlobLoc {
                                pack: p.id,
                                blob: b,
                            },
                        );
                    }
                }
            }
            Err(e) => r.errors.push(format!("index {}: {e:#}", id.short())),
        }
    }
    r.packs = packs.len();
    let pack_files = repo.list(crate::format::FileKind::Pack)?;
    let listed: HashMap<PackId, u64> = pack_files
        .files
        .iter()
        .map(|f| (PackId(f.id), f.size))
        .collect();
    for name in &pack_files.stray {
        r.notes.push(format!("stray file packs/{name}"));
    }
    let mut bad_packs: HashSet<PackId> = HashSet::new();
    let mut bad_blobs: HashSet<BlobId> = HashSet::new();
    for (id, size) in &packs {
        let Some(&s) = listed.get(id) else {
            r.errors.push(format!("pack {} is missing", id.short()));
            bad_packs.insert(*id);
            continue;
        };
        if s != *size {
            r.errors.push(format!(
                "pack {} has size {s}, the index says {size}",
                id.short()
            ));
            bad_packs.insert(*id);
        }
    }
    for id in listed.keys() {
        if !packs.contains_key(id) {
            r.notes.push(format!(
                "pack {} is not in any index (left by an interrupted run; harmless)",
                id.short()
            ));
        }
    }
    // Data.
    if read_data {
        let bar = progress.then(|| crate::progress::bytes_bar("reading packs"));
        if let Some(b) = &bar {
            b.set_length(packs.values().sum());
        }
        let mut by_pack: HashMap<PackId, Vec<repo::PackBlob>> = HashMap::new();
        for l in blobs.values() {
            by_pack.entry(l.pack).or_default().push(l.blob);
        }
        let todo: Vec<PackId> = packs
            .keys()
            .filter(|id| !bad_packs.contains(id))
            .copied()
            .collect();
        for id in &todo {
            let (data, intact) = match repo.read_pack(id) {
                Ok(p) => (p.data, p.intact),
                Err(e) => {
                    r.errors
                        .push(format!("pack {}: {}", id.short(), e.root_cause()));
                    bad_packs.insert(*id);
                    continue;
                }
            };
            r.bytes_read += data.len() as u64;
            if let Some(b) = &bar {
                b.inc(data.len() as u64);
            }
            // A damaged pack is reported; what it costs is decided blob by
            // blob below (its intact blobs still restore).
            if !intact {
                r.errors
                    .push(format!("pack {} is corrupt (blake3 mismatch)", id.short()));
            }
            if let Err(e) = repo::parse_pack_tail(&data) {
                r.errors.push(format!("pack {}: {e:#}", id.short()));
            }
            for b in by_pack.get(id).map(Vec::as_slice).unwrap_or_default() {
                let b = *b;
                let start = b.offset as usize;
                let Some(raw) = start
                    .checked_add(b.len as usize)
                    .and_then(|end| data.get(start..end))
                else {
                    r.errors.push(format!(
                        "blob {} lies outside pack {}",
                        b.id.short(),
                        id.short()
                    ));
                    bad_blobs.insert(b.id);
                    continue;
                };
                if let Err(e) = repo::decode_blob(&b, raw.to_vec()) {
                    r.errors.push(format!("pack {}: {e:#}", id.short()));
                    bad_blobs.insert(b.id);
                }
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    }
    // Snapshots and layers.
    let mut layer_ok: HashMap<LayerId, bool> = HashMap::new();
    let mut damaged = BTreeSet::new();
    let snapshot_files = repo.list(crate::format::FileKind::Snapshot)?;
    for name in &snapshot_files.stray {
        r.notes.push(format!("stray file snapshots/{name}"));
    }
    for sid in snapshot_files.files.iter().map(|f| SnapshotId(f.id)) {
        r.snapshots += 1;
        let snap = match repo.read_snapshot(&sid) {
            Ok(s) => s,
            Err(e) => {
                r.errors.push(format!("snapshot {}: {e:#}", sid.short()));
                damaged.insert(sid.hex());
                continue;
            }
        };
        for lid in &snap.layers {
            let ok = *layer_ok
                .entry(*lid)
                .or_insert_with(|| match repo.read_layer(lid) {
                    Ok(layer) => {
                        let mut ok = true;
                        let mut missing = 0usize;
                        for e in &layer.entries {
                            if let Node::File { extents, .. } = &e.node {
                                for c in extents.iter().flat_map(|x| &x.chunks) {
                                    match blobs.get(&c.id) {
                                        None => missing += 1,
                                        Some(l)
                                            if bad_packs.contains(&l.pack)
                                                || bad_blobs.contains(&c.id) =>
                                        {
                                            missing += 1
                                        }
                                        _ => {}
                                    }
                                }
                            }
                        }
                        if missing > 0 {
                            r.errors.push(format!(
                                "layer {}: {missing} chunks are missing or damaged",
                                lid.short()
                            ));
                            ok = false;
                        }
                        ok
                    }
                    Err(e) => {
                        r.errors.push(format!("layer {}: {e:#}", lid.short()));
                        false
                    }
                });
            if !ok {
                damaged.insert(sid.hex());
            }
        }
    }
    r.layers = layer_ok.len();
    r.damaged_snapshots = damaged.into_iter().collect();
    Ok(r)
}

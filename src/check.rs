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
    /// `encrypted` or `plaintext`.
    pub protection: String,
    /// Key files that open (encrypted repositories).
    pub keys: usize,
}

/// What the phases of a check share: the report, and what the index says.
struct Checker<'r> {
    repo: &'r Repo,
    r: Report,
    blobs: HashMap<BlobId, repo::BlobLoc>,
    packs: HashMap<PackId, u64>,
    bad_packs: HashSet<PackId>,
    bad_blobs: HashSet<BlobId>,
}

/// Check the repository. With `read_data`, read every pack and verify every
/// blob's blake3.
///
/// # Errors
/// Only when the repository cannot be listed at all; damage is reported in
/// the [`Report`].
pub fn check(repo: &Repo, read_data: bool, progress: bool) -> Result<Report> {
    let mut c = Checker {
        repo,
        r: Report::default(),
        blobs: HashMap::new(),
        packs: HashMap::new(),
        bad_packs: HashSet::new(),
        bad_blobs: HashSet::new(),
    };
    c.keys()?;
    c.indexes()?;
    c.pack_files()?;
    if read_data {
        c.read_data(progress);
    }
    c.snapshots()?;
    Ok(c.r)
}

impl Checker<'_> {
    /// Say how the repository is protected; verify every key file.
    fn keys(&mut self) -> Result<()> {
        let keys = self.repo.ids::<crate::format::KeyId>()?;
        if !self.repo.is_encrypted() {
            self.r.protection = "plaintext".into();
            self.r.notes.push(
                "the repository is plaintext: whoever can read it can read every file in it (a new one made with `laybak init` is encrypted)".into(),
            );
            if !keys.is_empty() {
                self.r.errors.push(format!(
                    "a plaintext repository holds {} key files: its config may have been replaced",
                    keys.len()
                ));
            }
            return Ok(());
        }
        self.r.protection = "encrypted".into();
        let Some(k) = self.repo.crypt().keys() else {
            return Ok(());
        };
        for (id, size) in keys {
            // Its metadata opens with this repository's keys: it is ours.
            let r = if size > crate::crypt::MAX_KEY_FILE as u64 {
                Err(anyhow::anyhow!("{size} bytes, too big for a key file"))
            } else {
                self.repo
                    .read_file(&id)
                    .and_then(|d| crate::crypt::KeyFile::decode(&d))
                    .and_then(|kf| kf.meta(k))
            };
            match r {
                Ok(_) => self.r.keys += 1,
                Err(e) => self.r.errors.push(format!("key {}: {e:#}", id.short())),
            }
        }
        Ok(())
    }

    /// Read every index file: which blobs live where.
    fn indexes(&mut self) -> Result<()> {
        for id in self.repo.index_ids()? {
            match self.repo.read_index(&id) {
                Ok(ps) => {
                    for p in ps {
                        self.packs.insert(p.id, p.size);
                        for b in p.blobs {
                            let loc = repo::BlobLoc {
                                pack: p.id,
                                blob: b,
                            };
                            self.blobs.insert(b.id, loc);
                        }
                    }
                }
                Err(e) => self.r.errors.push(format!("index {}: {e:#}", id.short())),
            }
        }
        self.r.packs = self.packs.len();
        Ok(())
    }

    /// Every indexed pack exists with the size the index says.
    fn pack_files(&mut self) -> Result<()> {
        let pack_files = self.repo.list(crate::format::FileKind::Pack)?;
        let listed: HashMap<PackId, u64> = pack_files
            .files
            .iter()
            .map(|f| (PackId(f.id), f.size))
            .collect();
        let r = &mut self.r;
        for name in &pack_files.stray {
            r.notes.push(format!("stray file packs/{name}"));
        }
        for (id, size) in &self.packs {
            let Some(&s) = listed.get(id) else {
                r.errors.push(format!("pack {} is missing", id.short()));
                self.bad_packs.insert(*id);
                continue;
            };
            if s != *size {
                r.errors.push(format!(
                    "pack {} has size {s}, the index says {size}",
                    id.short()
                ));
                self.bad_packs.insert(*id);
            }
        }
        for id in listed.keys() {
            if !self.packs.contains_key(id) {
                r.notes.push(format!(
                    "pack {} is not in any index (left by an interrupted run; harmless)",
                    id.short()
                ));
            }
        }
        Ok(())
    }

    /// Read every pack and verify every blob in it.
    fn read_data(&mut self, progress: bool) {
        let bar = progress.then(|| crate::progress::bytes_bar("reading packs"));
        if let Some(b) = &bar {
            b.set_length(self.packs.values().sum());
        }
        let mut by_pack: HashMap<PackId, Vec<repo::PackBlob>> = HashMap::new();
        for l in self.blobs.values() {
            by_pack.entry(l.pack).or_default().push(l.blob);
        }
        let todo: Vec<PackId> = self
            .packs
            .keys()
            .filter(|id| !self.bad_packs.contains(id))
            .copied()
            .collect();
        for id in &todo {
            let (data, intact) = match self.repo.read_pack(id) {
                Ok(p) => (p.data, p.intact),
                Err(e) => {
                    let why = e.root_cause();
                    self.r.errors.push(format!("pack {}: {why}", id.short()));
                    self.bad_packs.insert(*id);
                    continue;
                }
            };
            self.r.bytes_read += data.len() as u64;
            if let Some(b) = &bar {
                b.inc(data.len() as u64);
            }
            self.verify_pack(id, &data, intact, by_pack.get(id).map(Vec::as_slice));
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
    }

    /// A damaged pack is reported; what it costs is decided blob by blob
    /// (its intact blobs still restore).
    fn verify_pack(
        &mut self,
        id: &PackId,
        data: &[u8],
        intact: bool,
        blobs: Option<&[repo::PackBlob]>,
    ) {
        let r = &mut self.r;
        if !intact {
            r.errors
                .push(format!("pack {} is corrupt (blake3 mismatch)", id.short()));
        }
        if let Err(e) = self.repo.parse_pack_tail(data) {
            r.errors.push(format!("pack {}: {e:#}", id.short()));
        }
        for b in blobs.unwrap_or_default() {
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
                self.bad_blobs.insert(b.id);
                continue;
            };
            if let Err(e) = self.repo.decode_blob(&b, raw.to_vec()) {
                r.errors.push(format!("pack {}: {e:#}", id.short()));
                self.bad_blobs.insert(b.id);
            }
        }
    }

    /// Every snapshot's layers read, and every chunk they use is indexed
    /// in a pack that is present (and, with `--read-data`, verified).
    fn snapshots(&mut self) -> Result<()> {
        let mut layer_ok: HashMap<LayerId, bool> = HashMap::new();
        let mut damaged = BTreeSet::new();
        let snapshot_files = self.repo.list(crate::format::FileKind::Snapshot)?;
        for name in &snapshot_files.stray {
            self.r.notes.push(format!("stray file snapshots/{name}"));
        }
        for sid in snapshot_files.files.iter().map(|f| SnapshotId(f.id)) {
            self.r.snapshots += 1;
            let snap = match self.repo.read_snapshot(&sid) {
                Ok(s) => s,
                Err(e) => {
                    self.r
                        .errors
                        .push(format!("snapshot {}: {e:#}", sid.short()));
                    damaged.insert(sid.hex());
                    continue;
                }
            };
            for lid in &snap.layers {
                let ok = match layer_ok.get(lid) {
                    Some(ok) => *ok,
                    None => {
                        let ok = self.layer(lid);
                        layer_ok.insert(*lid, ok);
                        ok
                    }
                };
                if !ok {
                    damaged.insert(sid.hex());
                }
            }
        }
        self.r.layers = layer_ok.len();
        self.r.damaged_snapshots = damaged.into_iter().collect();
        Ok(())
    }

    /// Whether one layer reads and all its chunks are there.
    fn layer(&mut self, lid: &LayerId) -> bool {
        let (layer, pages) = match self.repo.read_layer_parts(lid) {
            Ok(l) => l,
            Err(e) => {
                self.r.errors.push(format!("layer {}: {e:#}", lid.short()));
                return false;
            }
        };
        let gone = |id: &crate::format::BlobId| match self.blobs.get(id) {
            None => true,
            Some(l) => self.bad_packs.contains(&l.pack) || self.bad_blobs.contains(id),
        };
        // Its pages read, but one in a damaged pack is named too.
        let bad_pages = pages.iter().filter(|p| gone(p)).count();
        let missing: usize = layer
            .entries
            .iter()
            .filter_map(|e| match &e.node {
                Node::File { extents, .. } => Some(extents),
                _ => None,
            })
            .flat_map(|x| x.iter().flat_map(|x| &x.chunks))
            .filter(|c| gone(&c.id))
            .count();
        if bad_pages > 0 {
            self.r.errors.push(format!(
                "layer {}: {bad_pages} pages of its manifest are in damaged packs",
                lid.short()
            ));
        }
        if missing > 0 {
            self.r.errors.push(format!(
                "layer {}: {missing} chunks are missing or damaged",
                lid.short()
            ));
        }
        missing == 0 && bad_pages == 0
    }
}

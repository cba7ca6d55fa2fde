//! Archiving one sealed layer directory into a repository: scan it, store
//! new data in packs, write the index, the layer manifest, then the
//! snapshot record — in that order, each file written whole, so a record
//! never points at data that is not stored. Volumes call this for each
//! pending layer; it needs no mount and no root, which is what lets the
//! crash tests enumerate every storage operation it makes.

use crate::format::{LayerId, SnapshotId, Time};
use crate::repo::{Packer, Repo, Snapshot};
use crate::scan::{self, Source};
use anyhow::{Context, Result};
use std::path::Path;

/// What the new snapshot record says besides its layer.
pub struct Record {
    /// Volume name.
    pub volume: String,
    /// When the layer was sealed.
    pub time: Time,
    /// User tags.
    pub tags: Vec<String>,
    /// The previous snapshot of the volume.
    pub parent: Option<SnapshotId>,
    /// Repository layers below this one, bottom first.
    pub below: Vec<LayerId>,
}

/// A snapshot that is stored.
#[derive(Debug, Clone)]
pub struct Archived {
    /// Snapshot id.
    pub id: SnapshotId,
    /// Snapshot record.
    pub snap: Snapshot,
}

/// Archive `dir` (a base tree or a sealed upper, as `source` says) as a
/// new snapshot. `blob_cache` is where the local blob cache lives, if any.
/// `before_record(layer, snapshot)` runs once the layer manifest is stored
/// and the snapshot's id is known, before its record is written, so a
/// caller can note what a crash might leave half done.
///
/// # Errors
/// The scan or a repository write failed; what was stored stays (packs and
/// manifests without a record are harmless and reused by the next run).
pub fn archive_layer(
    repo: &Repo,
    dir: &Path,
    source: Source,
    blob_cache: Option<&Path>,
    record: Record,
    progress: bool,
    before_record: impl FnOnce(&LayerId, &SnapshotId) -> Result<()>,
) -> Result<Archived> {
    let bar = progress.then(|| crate::progress::bytes_bar("archiving"));
    let packer = match blob_cache {
        Some(d) => Packer::with_cache(repo, d),
        None => Packer::new(repo),
    };
    crate::failpoint::hit("scan")?;
    // A large tree is sorted on disk, beside the blob cache (the volume's
    // state directory, root's own).
    let spill =
        crate::spill::Spill::in_dir(&blob_cache.map_or_else(std::env::temp_dir, Path::to_path_buf));
    let (scanned, mut summary) =
        scan::scan(dir, source, &packer, &repo.config, bar.as_ref(), &spill)?;
    // A large manifest's pages go into the same packs as the data.
    let layer_file = repo.stage_entries(&|| Ok(scanned.entries()), &packer)?;
    drop(scanned);
    let added = packer.finish()?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    summary.new_blobs = added.blobs;
    summary.new_bytes = added.bytes;
    crate::failpoint::hit("manifest-write")?;
    let layer_id = repo.put_layer(layer_file)?;
    let mut layers = record.below;
    layers.push(layer_id);
    let snap = Snapshot {
        time: record.time,
        volume: record.volume,
        hostname: Repo::hostname(),
        tags: record.tags,
        parent: record.parent,
        layers,
        summary,
    };
    let sealed = repo.seal_snapshot(&snap)?;
    let id = SnapshotId(sealed.id);
    before_record(&layer_id, &id)?;
    crate::failpoint::hit("snapshot-write")?;
    repo.put(&sealed)
        .context("the snapshot record was not written")?;
    crate::failpoint::hit("snapshot-written")?;
    Ok(Archived { id, snap })
}

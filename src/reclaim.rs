//! Reclaiming space: retention policies (`forget`), squashing a chain
//! prefix (`squash --until`), and `prune`.
//!
//! Forgetting a snapshot merges its layer into the next kept snapshot's
//! layer with [`layer::squash`]; kept snapshots keep their ids (their
//! records are rewritten in place). The rewrite is journaled as a plan file
//! written before any record changes, so a crash mid-way is completed by the
//! next `forget` or `prune`. `prune` deletes what no snapshot references,
//! under an exclusive repository lock (see `lock`).

use crate::format::{self, FileKind, Id, Time};
use crate::layer::{self, Layer, Node};
use crate::repo::{self, IndexPack, PackBlob, Repo, Snapshot};
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A retention policy; a snapshot is kept when any rule keeps it. The newest
/// snapshot of every volume is always kept (the next snapshot builds on it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Keep the newest N.
    pub last: usize,
    /// Keep the newest of each of the last N hours with snapshots.
    pub hourly: usize,
    /// ... days.
    pub daily: usize,
    /// ... weeks (Monday to Sunday, UTC).
    pub weekly: usize,
    /// ... months.
    pub monthly: usize,
    /// ... years.
    pub yearly: usize,
    /// Keep everything newer than this many seconds before the newest.
    pub within_secs: Option<u64>,
    /// Keep snapshots carrying any of these tags.
    pub tags: Vec<String>,
}

impl Policy {
    /// True when no rule is set (forget refuses to run then).
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// Days since the epoch → (year, month, day), proleptic Gregorian, UTC.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Which snapshots (indexes into `times`, any order) a policy keeps.
pub fn keep(policy: &Policy, snaps: &[(Time, Vec<String>)]) -> BTreeSet<usize> {
    let mut order: Vec<usize> = (0..snaps.len()).collect();
    order.sort_by(|a, b| snaps[*b].0.cmp(&snaps[*a].0));
    let mut kept = BTreeSet::new();
    if let Some(&newest) = order.first() {
        kept.insert(newest);
    }
    for (n, &i) in order.iter().enumerate() {
        if n < policy.last {
            kept.insert(i);
        }
        if snaps[i].1.iter().any(|t| policy.tags.contains(t)) {
            kept.insert(i);
        }
        if let (Some(w), Some(&newest)) = (policy.within_secs, order.first())
            && snaps[newest].0.secs.saturating_sub(snaps[i].0.secs)
                <= i64::try_from(w).unwrap_or(i64::MAX)
        {
            kept.insert(i);
        }
    }
    type Bucket = fn(i64) -> i64;
    let rules: [(usize, Bucket); 5] = [
        (policy.hourly, |s| s.div_euclid(3600)),
        (policy.daily, |s| s.div_euclid(86_400)),
        (policy.weekly, |s| (s.div_euclid(86_400) + 3).div_euclid(7)),
        (policy.monthly, |s| {
            let (y, m, _) = civil(s.div_euclid(86_400));
            y * 12 + m as i64
        }),
        (policy.yearly, |s| civil(s.div_euclid(86_400)).0),
    ];
    for (count, bucket) in rules {
        let mut last = None;
        let mut n = 0;
        for &i in &order {
            if n >= count {
                break;
            }
            let b = bucket(snaps[i].0.secs);
            if last != Some(b) {
                kept.insert(i);
                last = Some(b);
                n += 1;
            }
        }
    }
    kept
}

/// Decides which snapshots of one volume (oldest first) to keep.
pub type KeepFn<'a> = &'a dyn Fn(&[(Id, Snapshot)]) -> BTreeSet<usize>;

/// Squashed layers made by a forget, with their ids.
pub type NewLayers = Vec<(Id, Layer)>;

/// A journaled forget: kept snapshots to rewrite and snapshots to delete.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Plan {
    /// (snapshot, its new layer list).
    pub rewrite: Vec<(Id, Vec<Id>)>,
    /// Snapshot records to delete.
    pub delete: Vec<Id>,
}

/// What `forget` decided, for printing.
#[derive(Debug, Default, Serialize)]
pub struct ForgetReport {
    /// Kept snapshots (hex ids).
    pub keep: Vec<String>,
    /// Forgotten snapshots (hex ids).
    pub remove: Vec<String>,
    /// New squashed layers (hex ids).
    pub new_layers: Vec<String>,
    /// Snapshot records whose layer lists change (hex ids).
    pub rewritten: Vec<String>,
    /// (volume, new layer, the layers it replaces), for hosts that keep
    /// those layers locally.
    pub squashed: Vec<(String, String, Vec<String>)>,
    /// Net bytes forget itself frees: deleted and shrunk snapshot records
    /// minus new squashed layers (negative when it adds more). The data
    /// is freed by `prune`.
    pub bytes_freed: i64,
}

fn is_prefix(a: &[Id], b: &[Id]) -> bool {
    a.len() <= b.len() && a == &b[..a.len()]
}

/// Compute a plan: `keep_of(volume, snapshots)` says which to keep. New
/// squashed layers are returned, not written.
fn make_plan(
    repo: &Repo,
    snaps: &[(Id, Snapshot)],
    keep_of: KeepFn<'_>,
    volume: Option<&str>,
) -> Result<(Plan, NewLayers, ForgetReport)> {
    let mut by_vol: BTreeMap<&str, Vec<(Id, Snapshot)>> = BTreeMap::new();
    for (id, s) in snaps {
        if volume.is_none_or(|v| v == s.volume) {
            by_vol.entry(&s.volume).or_default().push((*id, s.clone()));
        }
    }
    let mut plan = Plan::default();
    let mut new_layers: Vec<(Id, Layer)> = Vec::new();
    let mut report = ForgetReport::default();
    for list in by_vol.values() {
        let kept = keep_of(list);
        for (i, (id, _)) in list.iter().enumerate() {
            if kept.contains(&i) {
                report.keep.push(id.hex());
            } else {
                plan.delete.push(*id);
                report.remove.push(id.hex());
            }
        }
        if kept.len() == list.len() {
            continue;
        }
        // Kept snapshots oldest first; each one's layers beyond the
        // previous kept one's are squashed into one layer.
        let mut prev_old: Vec<Id> = Vec::new();
        let mut prev_new: Vec<Id> = Vec::new();
        for (i, (id, s)) in list.iter().enumerate() {
            if !kept.contains(&i) {
                continue;
            }
            let (base_new, delta) = if !prev_old.is_empty() && is_prefix(&prev_old, &s.layers) {
                (prev_new.clone(), s.layers[prev_old.len()..].to_vec())
            } else {
                (Vec::new(), s.layers.clone())
            };
            let bottom = base_new.is_empty();
            let top = match delta.as_slice() {
                [] => None,
                [one] => Some(*one),
                many => {
                    let layers: Vec<Layer> = many
                        .iter()
                        .map(|l| repo.read_layer(l))
                        .collect::<Result<_>>()?;
                    let sq = layer::squash(&layers, bottom);
                    let data = format::encode(FileKind::Layer, &sq)?;
                    let lid = Id::of(&data);
                    if !new_layers.iter().any(|(x, _)| *x == lid) {
                        new_layers.push((lid, sq));
                        report.new_layers.push(lid.hex());
                        report.squashed.push((
                            s.volume.clone(),
                            lid.hex(),
                            many.iter().map(Id::hex).collect(),
                        ));
                    }
                    Some(lid)
                }
            };
            let mut new = base_new;
            new.extend(top);
            if new != s.layers {
                plan.rewrite.push((*id, new.clone()));
                report.rewritten.push(id.hex());
            }
            prev_old = s.layers.clone();
            prev_new = new;
        }
    }
    Ok((plan, new_layers, report))
}

/// Apply (or finish) a written plan. Idempotent.
fn apply_plan(repo: &Repo, plan_id: &Id, plan: &Plan) -> Result<()> {
    for (id, layers) in &plan.rewrite {
        crate::failpoint::hit("forget-rewrite")?;
        if !repo.contains(FileKind::Snapshot, id)? {
            continue; // forgotten meanwhile
        }
        // A damaged record stops the plan (kept for a rerun) rather than
        // being skipped silently.
        let mut s = repo.read_snapshot(id)?;
        if s.layers != *layers {
            s.layers = layers.clone();
            repo.rewrite_snapshot(id, &s)?;
        }
    }
    for id in &plan.delete {
        crate::failpoint::hit("forget-delete")?;
        repo.delete_file(FileKind::Snapshot, id)?;
    }
    repo.delete_file(FileKind::Plan, plan_id)?;
    Ok(())
}

/// Finish plans left by interrupted runs.
///
/// # Errors
/// A plan cannot be read or applied.
pub fn finish_plans(repo: &Repo) -> Result<usize> {
    let ids: Vec<Id> = repo
        .list(FileKind::Plan)?
        .files
        .iter()
        .map(|f| f.id)
        .collect();
    for id in &ids {
        let data = repo.read_file(FileKind::Plan, id).with_context(|| {
            format!(
                "forget plan {} cannot be used: remove plans/{} after checking the repository",
                id.short(),
                id.hex()
            )
        })?;
        let plan: Plan = format::decode(FileKind::Plan, &data)
            .with_context(|| format!("forget plan {} is corrupt", id.hex()))?;
        apply_plan(repo, id, &plan)?;
    }
    Ok(ids.len())
}

/// Forget snapshots by policy (or by a keep function), squashing layers of
/// forgotten snapshots into the next kept one. With `dry_run` nothing is
/// written.
///
/// # Errors
/// Repository failures; a crash leaves a plan the next run completes.
pub fn forget(
    repo: &Repo,
    keep_of: KeepFn<'_>,
    volume: Option<&str>,
    dry_run: bool,
) -> Result<(ForgetReport, Plan, NewLayers)> {
    if !dry_run {
        finish_plans(repo)?;
    }
    let snaps = repo.snapshots()?;
    if let Some(v) = volume
        && !snaps.iter().any(|(_, s)| s.volume == v)
    {
        bail!("no snapshot of volume {v:?} in the repository");
    }
    let (plan, new_layers, mut report) = make_plan(repo, &snaps, keep_of, volume)?;
    let sizes: HashMap<Id, u64> = repo
        .list(FileKind::Snapshot)?
        .files
        .iter()
        .map(|f| (f.id, f.size))
        .collect();
    let size = |id: &Id| sizes.get(id).copied().unwrap_or(0) as i64;
    let layer_files: HashSet<Id> = repo
        .list(FileKind::Layer)?
        .files
        .iter()
        .map(|f| f.id)
        .collect();
    let mut freed: i64 = 0;
    for id in &plan.delete {
        freed += size(id);
    }
    for (id, layers) in &plan.rewrite {
        if let Some((_, s)) = snaps.iter().find(|(i, _)| i == id) {
            let mut s = s.clone();
            s.layers = layers.clone();
            freed += size(id);
            freed -= format::encode_sealed(FileKind::Snapshot, &s)?.len() as i64;
        }
    }
    for (id, l) in &new_layers {
        if !layer_files.contains(id) {
            freed -= format::encode(FileKind::Layer, l)?.len() as i64;
        }
    }
    report.bytes_freed = freed;
    if dry_run || (plan.rewrite.is_empty() && plan.delete.is_empty()) {
        return Ok((report, plan, new_layers));
    }
    for (_, l) in &new_layers {
        crate::failpoint::hit("forget-layer")?;
        repo.write_layer(l)?;
    }
    let data = format::encode(FileKind::Plan, &plan)?;
    crate::failpoint::hit("forget-plan")?;
    let plan_id = repo.write_file(FileKind::Plan, data)?;
    apply_plan(repo, &plan_id, &plan)?;
    Ok((report, plan, new_layers))
}

/// The keep function for `squash --until SNAP`: SNAP and everything after.
pub fn keep_from(until: Id) -> impl Fn(&[(Id, Snapshot)]) -> BTreeSet<usize> {
    move |list: &[(Id, Snapshot)]| {
        let t = list.iter().find(|(i, _)| *i == until).map(|(_, s)| s.time);
        (0..list.len())
            .filter(|&i| t.is_none_or(|t| list[i].1.time >= t))
            .collect()
    }
}

/// The keep function for a policy.
pub fn keep_by(policy: Policy) -> impl Fn(&[(Id, Snapshot)]) -> BTreeSet<usize> {
    move |list: &[(Id, Snapshot)]| {
        let v: Vec<(Time, Vec<String>)> =
            list.iter().map(|(_, s)| (s.time, s.tags.clone())).collect();
        keep(&policy, &v)
    }
}

/// What `prune` removed or would remove.
#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    /// Packs deleted whole (no used blob).
    pub packs_deleted: usize,
    /// Packs rewritten to drop unused blobs.
    pub packs_repacked: usize,
    /// Packs no index mentions (left by interrupted runs).
    pub packs_unindexed: usize,
    /// New packs written by repacking.
    pub packs_written: usize,
    /// Layer manifests no snapshot references.
    pub layers_deleted: usize,
    /// Index files replaced by one new index.
    pub indexes_replaced: usize,
    /// Bytes of blobs no snapshot references that stay (below the threshold).
    pub unused_bytes_kept: u64,
    /// Net bytes freed (removed files minus files written).
    pub bytes_freed: u64,
}

/// Remove what no snapshot references. Packs whose unused share exceeds
/// `max_unused` (0.0–1.0) are repacked; wholly unused packs are deleted.
/// With `extra` (a dry-run forget's result) the analysis sees the
/// repository as that forget would leave it.
///
/// # Errors
/// Busy repository, or I/O failures (rerun to finish).
pub fn prune(
    repo: &Repo,
    max_unused: f64,
    dry_run: bool,
    extra: Option<(&Plan, &[(Id, Layer)])>,
) -> Result<PruneReport> {
    let _lock = if dry_run {
        None
    } else {
        Some(crate::lock::exclusive(repo, "prune")?)
    };
    if !dry_run {
        finish_plans(repo)?;
    }
    let mut snaps = repo.snapshots()?;
    let mut extra_layers: HashMap<Id, &Layer> = HashMap::new();
    if let Some((plan, layers)) = extra {
        let del: HashSet<Id> = plan.delete.iter().copied().collect();
        snaps.retain(|(i, _)| !del.contains(i));
        for (id, l) in &plan.rewrite {
            if let Some(s) = snaps.iter_mut().find(|(i, _)| i == id) {
                s.1.layers = l.clone();
            }
        }
        for (id, l) in layers {
            extra_layers.insert(*id, l);
        }
    }
    // Mark.
    let mut used_layers: BTreeSet<Id> = BTreeSet::new();
    for (_, s) in &snaps {
        used_layers.extend(s.layers.iter().copied());
    }
    let mut used_blobs: HashSet<Id> = HashSet::new();
    for l in &used_layers {
        let owned;
        let layer: &Layer = match extra_layers.get(l) {
            Some(x) => x,
            None => {
                owned = repo.read_layer(l)?;
                &owned
            }
        };
        for e in &layer.entries {
            if let Node::File { extents, .. } = &e.node {
                used_blobs.extend(extents.iter().flat_map(|x| x.chunks.iter().map(|c| c.id)));
            }
        }
    }
    // Classify packs.
    let mut report = PruneReport::default();
    let mut removed: u64 = 0;
    let mut added: u64 = 0;
    let index_files = repo.list(FileKind::Index)?.files;
    let index_ids: Vec<Id> = index_files.iter().map(|f| f.id).collect();
    let mut packs: BTreeMap<Id, IndexPack> = BTreeMap::new();
    for i in &index_ids {
        for p in repo.read_index(i)? {
            packs.insert(p.id, p);
        }
    }
    let mut keep_packs: Vec<IndexPack> = Vec::new();
    let mut repack: Vec<(IndexPack, Vec<PackBlob>)> = Vec::new();
    let mut delete_packs: Vec<Id> = Vec::new();
    let mut seen_blobs: HashSet<Id> = HashSet::new();
    for p in packs.values() {
        let mut used = Vec::new();
        let mut unused_bytes = 0u64;
        for b in &p.blobs {
            if used_blobs.contains(&b.id) && seen_blobs.insert(b.id) {
                used.push(*b);
            } else {
                unused_bytes += b.len as u64;
            }
        }
        if used.is_empty() {
            delete_packs.push(p.id);
        } else if unused_bytes as f64 > max_unused * p.size as f64 {
            repack.push((p.clone(), used));
        } else {
            report.unused_bytes_kept += unused_bytes;
            keep_packs.push(p.clone());
        }
    }
    let indexed: HashSet<Id> = packs.keys().copied().collect();
    let pack_sizes: HashMap<Id, u64> = repo
        .list(FileKind::Pack)?
        .files
        .iter()
        .map(|f| (f.id, f.size))
        .collect();
    let unindexed: Vec<Id> = pack_sizes
        .keys()
        .filter(|id| !indexed.contains(id))
        .copied()
        .collect();
    report.packs_unindexed = unindexed.len();
    report.packs_deleted = delete_packs.len();
    report.packs_repacked = repack.len();
    // Layers no snapshot references.
    let dead_layers: Vec<(Id, u64)> = repo
        .list(FileKind::Layer)?
        .files
        .iter()
        .filter(|l| !used_layers.contains(&l.id))
        .map(|l| (l.id, l.size))
        .collect();
    report.layers_deleted = dead_layers.len();
    let pack_size = |id: &Id| pack_sizes.get(id).copied().unwrap_or(0);
    for id in delete_packs.iter().chain(&unindexed) {
        removed += pack_size(id);
    }
    for (_, size) in &dead_layers {
        removed += size;
    }
    let nothing_to_do = repack.is_empty()
        && delete_packs.is_empty()
        && unindexed.is_empty()
        && dead_layers.is_empty();
    if nothing_to_do {
        return Ok(report);
    }
    // Repack: copy the stored bytes of used blobs into new packs.
    let mut writer = repo::PackAssembler::new(repo.config.pack_size as usize);
    let mut new_packs: Vec<repo::SealedPack> = Vec::new();
    for (p, used) in &repack {
        removed += p.size;
        let pack = repo
            .read_pack(&p.id)
            .with_context(|| format!("cannot read pack {} to repack it", p.id.short()))?;
        let data = pack.data;
        if !pack.intact {
            bail!(
                "pack {} is corrupt; run `laybak check --read-data` before pruning",
                p.id.short()
            );
        }
        for b in used {
            let raw = data
                .get(b.offset as usize..b.offset as usize + b.len as usize)
                .ok_or_else(|| anyhow!("pack {} is shorter than its index says", p.id.short()))?;
            repo::decode_blob(b, raw.to_vec())?;
            if let Some(done) = writer.add_stored(b, raw) {
                new_packs.push(done);
            }
        }
    }
    if let Some(done) = writer.finish() {
        new_packs.push(done);
    }
    // A rerun after a crash can rebuild a pack the crashed run already
    // wrote (same content, same id): it is then new and also unindexed, or
    // indexed but with every blob claimed by the old pack it was made
    // from (so "to delete"), or "to repack". Never delete a pack the new
    // index lists, whichever list it came from.
    let new_ids: HashSet<Id> = new_packs.iter().map(|p| p.file.id).collect();
    let keep_new = |ids: Vec<Id>, removed: &mut u64| -> Vec<Id> {
        ids.into_iter()
            .filter(|id| {
                let listed = new_ids.contains(id);
                if listed {
                    *removed = removed.saturating_sub(pack_size(id));
                }
                !listed
            })
            .collect()
    };
    let unindexed = keep_new(unindexed, &mut removed);
    let delete_packs = keep_new(delete_packs, &mut removed);
    let repacked = keep_new(repack.iter().map(|(p, _)| p.id).collect(), &mut removed);
    report.packs_unindexed = unindexed.len();
    report.packs_deleted = delete_packs.len();
    report.packs_written = new_packs.len();
    for p in &new_packs {
        if !pack_sizes.contains_key(&p.file.id) {
            added += p.file.len();
        }
    }
    // One new index for everything that stays.
    let mut all: Vec<IndexPack> = keep_packs;
    all.extend(new_packs.iter().map(|p| p.index.clone()));
    let new_index = repo::Sealed::new(FileKind::Index, format::encode(FileKind::Index, &all)?);
    added += new_index.len();
    for i in &index_files {
        if i.id != new_index.id {
            removed += i.size;
        } else {
            added -= new_index.len();
        }
    }
    report.indexes_replaced = index_ids.len();
    report.bytes_freed = removed.saturating_sub(added);
    if dry_run {
        return Ok(report);
    }
    // Sweep, in an order that keeps every snapshot restorable at each step:
    // new packs, new index, old indexes, then unreferenced layers and packs.
    for p in &new_packs {
        crate::failpoint::hit("prune-pack")?;
        repo.put(&p.file)?;
    }
    crate::failpoint::hit("prune-index")?;
    repo.put(&new_index)?;
    for i in &index_ids {
        if *i != new_index.id {
            crate::failpoint::hit("prune-old-index")?;
            repo.delete_file(FileKind::Index, i)?;
        }
    }
    for (l, _) in &dead_layers {
        crate::failpoint::hit("prune-layer")?;
        repo.delete_file(FileKind::Layer, l)?;
    }
    for id in &repacked {
        crate::failpoint::hit("prune-delete-pack")?;
        repo.delete_file(FileKind::Pack, id)?;
    }
    for id in delete_packs.iter().chain(&unindexed) {
        crate::failpoint::hit("prune-delete-pack")?;
        repo.delete_file(FileKind::Pack, id)?;
    }
    Ok(report)
}

/// What `repair index` did.
#[derive(Debug, Default, Serialize)]
pub struct RepairReport {
    /// Packs read.
    pub packs: usize,
    /// Blobs indexed.
    pub blobs: usize,
    /// Packs whose table could not be read (their blobs are lost).
    pub unreadable_packs: Vec<String>,
    /// Blobs that failed verification and were left out.
    pub bad_blobs: usize,
    /// Packs whose content does not match their name; their verified blobs
    /// are still indexed (salvaged).
    pub damaged_packs: Vec<String>,
}

/// Rebuild the index from the packs themselves: read every pack, parse its
/// blob table, verify every blob, and replace all index files with one
/// index of what verified. Takes the exclusive lock.
///
/// # Errors
/// Busy repository or I/O failures.
pub fn repair_index(repo: &Repo) -> Result<RepairReport> {
    let _lock = crate::lock::exclusive(repo, "repair index")?;
    let mut report = RepairReport::default();
    let mut all: Vec<IndexPack> = Vec::new();
    for id in repo.list(FileKind::Pack)?.files.iter().map(|f| f.id) {
        report.packs += 1;
        let pack = repo.read_pack(&id)?;
        let data = pack.data;
        if !pack.intact {
            report.damaged_packs.push(id.short());
        }
        let blobs = match repo::parse_pack_tail(&data) {
            Ok(b) => b,
            Err(e) => {
                report
                    .unreadable_packs
                    .push(format!("{}: {e:#}", id.short()));
                continue;
            }
        };
        let good: Vec<PackBlob> = blobs
            .into_iter()
            .filter(|b| {
                let raw = data[b.offset as usize..b.offset as usize + b.len as usize].to_vec();
                let ok = repo::decode_blob(b, raw).is_ok();
                if !ok {
                    report.bad_blobs += 1;
                }
                ok
            })
            .collect();
        report.blobs += good.len();
        if !good.is_empty() {
            all.push(IndexPack {
                id,
                size: data.len() as u64,
                blobs: good,
            });
        }
    }
    let old = repo.index_ids()?;
    let new = repo.write_index(&all)?;
    for i in old {
        if i != new {
            repo.delete_file(FileKind::Index, &i)?;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> (Time, Vec<String>) {
        (Time { secs, nanos: 0 }, Vec::new())
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(20_454), (2026, 1, 1));
        assert_eq!(civil(-1), (1969, 12, 31));
    }

    #[test]
    fn policies_pick_the_newest_per_bucket() {
        // Every 20 minutes for two days.
        let snaps: Vec<_> = (0..144).map(|i| t(1_700_000_000 + i * 1200)).collect();
        let p = |f: fn(&mut Policy)| {
            let mut p = Policy::default();
            f(&mut p);
            keep(&p, &snaps)
        };
        assert_eq!(p(|p| p.last = 5), (139..144).collect());
        let hourly = p(|p| p.hourly = 3);
        assert_eq!(hourly.len(), 3);
        assert!(hourly.contains(&143));
        for w in hourly.iter().collect::<Vec<_>>().windows(2) {
            assert_ne!(snaps[*w[0]].0.secs / 3600, snaps[*w[1]].0.secs / 3600);
        }
        assert_eq!(p(|p| p.daily = 10).len(), 3); // the data spans three UTC days
        assert_eq!(p(|p| p.within_secs = Some(3600)), (140..144).collect());
        // Found by fuzzing: huge durations and extreme times neither wrap nor panic.
        assert_eq!(p(|p| p.within_secs = Some(u64::MAX)).len(), 144);
        let extreme = vec![t(i64::MIN), t(i64::MAX)];
        let pol = Policy {
            within_secs: Some(10),
            ..Policy::default()
        };
        assert_eq!(keep(&pol, &extreme), [1].into_iter().collect());
        // The newest is always kept, even by an empty policy.
        assert_eq!(
            keep(&Policy::default(), &snaps),
            [143].into_iter().collect()
        );
        let mut tagged = snaps.clone();
        tagged[3].1.push("keep".into());
        let mut pol = Policy::default();
        pol.tags.push("keep".into());
        assert_eq!(keep(&pol, &tagged), [3, 143].into_iter().collect());
    }
}

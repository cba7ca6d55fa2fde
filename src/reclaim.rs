//! Reclaiming space: retention policies (`forget`), squashing a chain
//! prefix (`squash --until`), and `prune`.
//!
//! Forgetting a snapshot merges its layer into the next kept snapshot's
//! layer with [`layer::squash`]; kept snapshots keep their ids (their
//! records are rewritten in place). The rewrite is journaled as a plan file
//! written before any record changes, so a crash mid-way is completed by the
//! next `forget` or `prune`. `prune` deletes what no snapshot references,
//! under an exclusive repository lock (see `lock`).

use crate::format::{BlobId, FileKind, Id, IndexId, LayerId, PackId, PlanId, SnapshotId, Time};
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
pub type KeepFn<'a> = &'a dyn Fn(&[(SnapshotId, Snapshot)]) -> BTreeSet<usize>;

/// Squashed layers made by a forget, with their ids.
pub type NewLayers = Vec<(LayerId, Layer)>;

/// A journaled forget: kept snapshots to rewrite and snapshots to delete.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Plan {
    /// (snapshot, its new layer list).
    pub rewrite: Vec<(SnapshotId, Vec<LayerId>)>,
    /// Snapshot records to delete.
    pub delete: Vec<SnapshotId>,
}

/// What `forget` decided, for printing.
#[derive(Debug, Default, Serialize)]
pub struct ForgetReport {
    /// Kept snapshots.
    pub keep: Vec<SnapshotId>,
    /// Forgotten snapshots.
    pub remove: Vec<SnapshotId>,
    /// New squashed layers.
    pub new_layers: Vec<LayerId>,
    /// Snapshot records whose layer lists change.
    pub rewritten: Vec<SnapshotId>,
    /// New layers and the layers they replace, for hosts that keep those
    /// layers locally.
    pub squashed: Vec<Squashed>,
    /// Net bytes forget itself frees: deleted and shrunk snapshot records
    /// minus new squashed layers (negative when it adds more). The data
    /// is freed by `prune`.
    pub bytes_freed: i64,
}

/// How long a forget waits for a prune's sweep to finish.
const FORGET_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What a forget did (or, dry, would do): the report users see, the plan
/// it journaled, and the squashed layers it wrote.
pub struct Forgot {
    /// Kept, removed, rewritten, squashed.
    pub report: ForgetReport,
    /// The snapshot rewrites and deletions.
    pub plan: Plan,
    /// New squashed layers (already written unless dry).
    pub new_layers: NewLayers,
}

/// A layer forget made by squashing others.
#[derive(Clone, Debug, Serialize)]
pub struct Squashed {
    /// Host of the history.
    pub host: String,
    /// Volume of the history.
    pub volume: String,
    /// The new layer.
    pub layer: LayerId,
    /// The layers it replaces, bottom first.
    pub from: Vec<LayerId>,
}

fn is_prefix(a: &[LayerId], b: &[LayerId]) -> bool {
    a.len() <= b.len() && a == &b[..a.len()]
}

/// Which snapshots a forget looks at. Retention always applies to each
/// (host, volume) history on its own: two hosts' volumes of the same name
/// are two histories.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scope<'a> {
    /// Only this volume name.
    pub volume: Option<&'a str>,
    /// Only snapshots taken on this host.
    pub host: Option<&'a str>,
}

impl Scope<'_> {
    fn matches(&self, s: &Snapshot) -> bool {
        self.volume.is_none_or(|v| v == s.volume) && self.host.is_none_or(|h| h == s.hostname)
    }
}

/// Compute a plan: `keep_of(snapshots)` says which of one history to
/// keep. New squashed layers are returned, not written.
fn make_plan(
    repo: &Repo,
    snaps: &[(SnapshotId, Snapshot)],
    keep_of: KeepFn<'_>,
    scope: Scope<'_>,
) -> Result<(Plan, NewLayers, ForgetReport)> {
    let mut by_vol: BTreeMap<(&str, &str), Vec<(SnapshotId, Snapshot)>> = BTreeMap::new();
    for (id, s) in snaps {
        if scope.matches(s) {
            by_vol
                .entry((&s.hostname, &s.volume))
                .or_default()
                .push((*id, s.clone()));
        }
    }
    let mut plan = Plan::default();
    let mut new_layers: Vec<(LayerId, Layer)> = Vec::new();
    let mut report = ForgetReport::default();
    for list in by_vol.values() {
        let kept = keep_of(list);
        for (i, (id, _)) in list.iter().enumerate() {
            if kept.contains(&i) {
                report.keep.push(*id);
            } else {
                plan.delete.push(*id);
                report.remove.push(*id);
            }
        }
        if kept.len() == list.len() {
            continue;
        }
        // Kept snapshots oldest first; each one's layers beyond the
        // previous kept one's are squashed into one layer.
        let mut prev_old: Vec<LayerId> = Vec::new();
        let mut prev_new: Vec<LayerId> = Vec::new();
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
                    let data = repo.encode_layer(&sq)?;
                    let lid = LayerId(Id::of(&data));
                    if !new_layers.iter().any(|(x, _)| *x == lid) {
                        new_layers.push((lid, sq));
                        report.new_layers.push(lid);
                        report.squashed.push(Squashed {
                            host: s.hostname.clone(),
                            volume: s.volume.clone(),
                            layer: lid,
                            from: many.to_vec(),
                        });
                    }
                    Some(lid)
                }
            };
            let mut new = base_new;
            new.extend(top);
            if new != s.layers {
                plan.rewrite.push((*id, new.clone()));
                report.rewritten.push(*id);
            }
            prev_old = s.layers.clone();
            prev_new = new;
        }
    }
    Ok((plan, new_layers, report))
}

/// Apply (or finish) a written plan. Idempotent.
fn apply_plan(repo: &Repo, plan_id: &PlanId, plan: &Plan) -> Result<()> {
    for (id, layers) in &plan.rewrite {
        crate::failpoint::hit("forget-rewrite")?;
        if !repo.contains(id)? {
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
        repo.delete_file(id)?;
    }
    repo.delete_file(plan_id)?;
    Ok(())
}

/// Finish plans left by interrupted runs.
///
/// # Errors
/// A plan cannot be read or applied.
pub fn finish_plans(repo: &Repo) -> Result<usize> {
    let ids: Vec<PlanId> = repo.ids::<PlanId>()?.into_iter().map(|(i, _)| i).collect();
    for id in &ids {
        // Finished and removed by a forget running meanwhile.
        if !repo.contains(id)? {
            continue;
        }
        let plan = repo.read_plan(id).with_context(|| {
            format!(
                "forget plan {} cannot be used: remove plans/{} after checking the repository",
                id.short(),
                id.hex()
            )
        })?;
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
pub fn forget(repo: &Repo, keep_of: KeepFn<'_>, scope: Scope<'_>, dry_run: bool) -> Result<Forgot> {
    // Shared: prune (exclusive in its sweep) must not delete the layers
    // this writes before the records that use them.
    let _lock = match dry_run {
        true => None,
        false => Some(crate::lock::shared(repo, "forget", FORGET_LOCK_WAIT)?),
    };
    if !dry_run {
        finish_plans(repo)?;
    }
    let snaps = repo.snapshots()?;
    if !snaps.iter().any(|(_, s)| scope.matches(s)) {
        match (scope.volume, scope.host) {
            (Some(v), Some(h)) => {
                bail!("no snapshot of volume {v:?} from host {h:?} in the repository")
            }
            (Some(v), None) => bail!("no snapshot of volume {v:?} in the repository"),
            (None, Some(h)) => bail!("no snapshot from host {h:?} in the repository"),
            (None, None) => {}
        }
    }
    let (plan, new_layers, mut report) = make_plan(repo, &snaps, keep_of, scope)?;
    let sizes: HashMap<SnapshotId, u64> = repo.ids::<SnapshotId>()?.into_iter().collect();
    let size = |id: &SnapshotId| sizes.get(id).copied().unwrap_or(0) as i64;
    let layer_files: HashSet<LayerId> =
        repo.ids::<LayerId>()?.into_iter().map(|(l, _)| l).collect();
    let mut freed: i64 = 0;
    for id in &plan.delete {
        freed += size(id);
    }
    for (id, layers) in &plan.rewrite {
        if let Some((_, s)) = snaps.iter().find(|(i, _)| i == id) {
            let mut s = s.clone();
            s.layers = layers.clone();
            freed += size(id);
            freed -= repo.encode_snapshot(id, &s)?.len() as i64;
        }
    }
    for (id, l) in &new_layers {
        if !layer_files.contains(id) {
            freed -= repo.encode_layer(l)?.len() as i64;
        }
    }
    report.bytes_freed = freed;
    if dry_run || (plan.rewrite.is_empty() && plan.delete.is_empty()) {
        return Ok(Forgot {
            report,
            plan,
            new_layers,
        });
    }
    for (_, l) in &new_layers {
        crate::failpoint::hit("forget-layer")?;
        repo.write_layer(l)?;
    }
    crate::failpoint::hit("forget-plan")?;
    let plan_id = repo.write_plan(&plan)?;
    apply_plan(repo, &plan_id, &plan)?;
    Ok(Forgot {
        report,
        plan,
        new_layers,
    })
}

/// The keep function for `squash --until SNAP`: SNAP and everything after.
pub fn keep_from(until: SnapshotId) -> impl Fn(&[(SnapshotId, Snapshot)]) -> BTreeSet<usize> {
    move |list: &[(SnapshotId, Snapshot)]| {
        let t = list.iter().find(|(i, _)| *i == until).map(|(_, s)| s.time);
        (0..list.len())
            .filter(|&i| t.is_none_or(|t| list[i].1.time >= t))
            .collect()
    }
}

/// The keep function for a policy.
pub fn keep_by(policy: Policy) -> impl Fn(&[(SnapshotId, Snapshot)]) -> BTreeSet<usize> {
    move |list: &[(SnapshotId, Snapshot)]| {
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

/// What a prune will do, computed from one view of the repository.
struct PrunePlan {
    /// Nothing to delete (the index files are left alone too).
    idle: bool,
    /// Snapshot → layers, as the plan saw them.
    seen: HashMap<SnapshotId, Vec<LayerId>>,
    used_layers: BTreeSet<LayerId>,
    /// The index files the plan read, and every pack they list.
    index_files: Vec<repo::Stored>,
    packs: BTreeMap<PackId, IndexPack>,
    /// Packs the new index lists.
    kept: HashSet<PackId>,
    new_packs: Vec<repo::SealedPack>,
    new_index: repo::Sealed,
    delete_packs: Vec<PackId>,
    unindexed: Vec<PackId>,
    repacked: Vec<PackId>,
    dead_layers: Vec<(LayerId, u64)>,
    report: PruneReport,
}

/// Blobs the file entries of `layer` use.
/// The blobs a stored layer uses: its file data and its pages (read
/// through `repo`'s index: a handle opened before the layer was written
/// may not know its pages).
fn layer_blobs(repo: &Repo, id: &LayerId, out: &mut HashSet<BlobId>) -> Result<()> {
    let (layer, pages) = repo.read_layer_parts(id)?;
    out.extend(pages);
    blobs_of(&layer, out);
    Ok(())
}

fn blobs_of(layer: &Layer, out: &mut HashSet<BlobId>) {
    for e in &layer.entries {
        if let Node::File { extents, .. } = &e.node {
            out.extend(extents.iter().flat_map(|x| x.chunks.iter().map(|c| c.id)));
        }
    }
}

/// Mark what the snapshots use, classify packs, and build the repacked
/// packs and the new index in memory. Writes nothing.
/// What the snapshots use: each one's layers, all used layers, and the
/// blobs those layers reference.
struct Marked {
    seen: HashMap<SnapshotId, Vec<LayerId>>,
    used_layers: BTreeSet<LayerId>,
    used_blobs: HashSet<BlobId>,
}

/// Mark: the snapshots (as `extra`, a dry-run forget, would leave them) and
/// everything they use.
fn mark(repo: &Repo, extra: Option<(&Plan, &[(LayerId, Layer)])>) -> Result<Marked> {
    let mut snaps = repo.snapshots()?;
    let mut extra_layers: HashMap<LayerId, &Layer> = HashMap::new();
    if let Some((plan, layers)) = extra {
        let del: HashSet<SnapshotId> = plan.delete.iter().copied().collect();
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
    let seen: HashMap<SnapshotId, Vec<LayerId>> =
        snaps.iter().map(|(i, s)| (*i, s.layers.clone())).collect();
    let used_layers: BTreeSet<LayerId> = snaps
        .iter()
        .flat_map(|(_, s)| s.layers.iter().copied())
        .collect();
    let mut used_blobs: HashSet<BlobId> = HashSet::new();
    for l in &used_layers {
        match extra_layers.get(l) {
            Some(x) => {
                blobs_of(x, &mut used_blobs);
                used_blobs.extend(repo.page_blobs(x)?);
            }
            None => layer_blobs(repo, l, &mut used_blobs)?,
        }
    }
    Ok(Marked {
        seen,
        used_layers,
        used_blobs,
    })
}

/// Packs sorted into kept (with their unused bytes), to repack (with the
/// blobs to copy) and to delete. Each used blob is claimed by the first
/// pack (in id order) that has it; other copies count as unused.
#[derive(Default)]
struct Classified {
    keep: Vec<IndexPack>,
    repack: Vec<(IndexPack, Vec<PackBlob>)>,
    delete: Vec<PackId>,
    unused_kept: u64,
}

fn classify(
    packs: &BTreeMap<PackId, IndexPack>,
    used_blobs: &HashSet<BlobId>,
    max_unused: f64,
) -> Classified {
    let mut c = Classified::default();
    let mut seen_blobs: HashSet<BlobId> = HashSet::new();
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
            c.delete.push(p.id);
        } else if unused_bytes as f64 > max_unused * p.size as f64 {
            c.repack.push((p.clone(), used));
        } else {
            c.unused_kept += unused_bytes;
            c.keep.push(p.clone());
        }
    }
    c
}

/// Copy the stored bytes of the used blobs of `repack` into new packs,
/// each blob verified first.
fn repack(repo: &Repo, repack: &[(IndexPack, Vec<PackBlob>)]) -> Result<Vec<repo::SealedPack>> {
    let mut writer = repo.pack_assembler();
    let mut new_packs: Vec<repo::SealedPack> = Vec::new();
    for (p, used) in repack {
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
            repo.decode_blob(b, raw.to_vec())?;
            if let Some(done) = writer.add_stored(b, raw)? {
                new_packs.push(done);
            }
        }
    }
    if let Some(done) = writer.finish()? {
        new_packs.push(done);
    }
    Ok(new_packs)
}

fn plan_prune(
    repo: &Repo,
    max_unused: f64,
    extra: Option<(&Plan, &[(LayerId, Layer)])>,
) -> Result<PrunePlan> {
    let Marked {
        seen,
        used_layers,
        used_blobs,
    } = mark(repo, extra)?;
    // Classify packs.
    let mut report = PruneReport::default();
    let mut removed: u64 = 0;
    let mut added: u64 = 0;
    let index_files = repo.list(FileKind::Index)?.files;
    let mut packs: BTreeMap<PackId, IndexPack> = BTreeMap::new();
    for i in &index_files {
        for p in repo.read_index(&IndexId(i.id))? {
            packs.insert(p.id, p);
        }
    }
    let Classified {
        keep: keep_packs,
        repack: to_repack,
        delete: delete_packs,
        unused_kept,
    } = classify(&packs, &used_blobs, max_unused);
    report.unused_bytes_kept = unused_kept;
    let pack_sizes: HashMap<PackId, u64> = repo.ids::<PackId>()?.into_iter().collect();
    let unindexed: Vec<PackId> = pack_sizes
        .keys()
        .filter(|id| !packs.contains_key(id))
        .copied()
        .collect();
    // Layers no snapshot references.
    let dead_layers: Vec<(LayerId, u64)> = repo
        .ids::<LayerId>()?
        .into_iter()
        .filter(|(l, _)| !used_layers.contains(l))
        .collect();
    let pack_size = |id: &PackId| pack_sizes.get(id).copied().unwrap_or(0);
    for id in delete_packs.iter().chain(&unindexed) {
        removed += pack_size(id);
    }
    for (_, size) in &dead_layers {
        removed += size;
    }
    removed += to_repack.iter().map(|(p, _)| p.size).sum::<u64>();
    let new_packs = repack(repo, &to_repack)?;
    // A rerun after a crash can rebuild a pack the crashed run already
    // wrote (same content, same id): it is then new and also unindexed, or
    // indexed but with every blob claimed by the old pack it was made
    // from (so "to delete"), or "to repack". Never delete a pack the new
    // index lists, whichever list it came from.
    let new_ids: HashSet<PackId> = new_packs.iter().map(|p| p.index.id).collect();
    let keep_new = |ids: Vec<PackId>, removed: &mut u64| -> Vec<PackId> {
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
    let repacked = keep_new(to_repack.iter().map(|(p, _)| p.id).collect(), &mut removed);
    for p in &new_packs {
        if !pack_sizes.contains_key(&p.index.id) {
            added += p.file.len();
        }
    }
    // One new index for everything that stays.
    let mut all: Vec<IndexPack> = keep_packs;
    all.extend(new_packs.iter().map(|p| p.index.clone()));
    let kept: HashSet<PackId> = all.iter().map(|p| p.id).collect();
    let new_index = repo.seal_index(&all)?;
    added += new_index.len();
    for i in &index_files {
        if i.id != new_index.id {
            removed += i.size;
        } else {
            added -= new_index.len();
        }
    }
    report.packs_unindexed = unindexed.len();
    report.packs_deleted = delete_packs.len();
    report.packs_repacked = to_repack.len();
    report.packs_written = new_packs.len();
    report.layers_deleted = dead_layers.len();
    report.indexes_replaced = index_files.len();
    report.bytes_freed = removed.saturating_sub(added);
    let idle = to_repack.is_empty()
        && delete_packs.is_empty()
        && unindexed.is_empty()
        && dead_layers.is_empty();
    if idle {
        // Nothing unused: the index files stay as they are.
        report.indexes_replaced = 0;
        report.bytes_freed = 0;
    }
    Ok(PrunePlan {
        idle,
        seen,
        used_layers,
        index_files,
        packs,
        kept,
        new_packs,
        new_index,
        delete_packs,
        unindexed,
        repacked,
        dead_layers,
        report,
    })
}

impl PrunePlan {
    /// Under the exclusive lock: take in what changed since the plan was
    /// made. Packs that an index written since lists, or that hold a blob
    /// a new or rewritten snapshot uses and no kept pack has, are not
    /// deleted (the latter are listed again in `readopt`); layers a
    /// snapshot uses now are not deleted.
    fn recheck(&mut self, repo: &Repo) -> Result<Vec<IndexPack>> {
        let snaps = repo.snapshots()?;
        let mut fresh_layers: BTreeSet<LayerId> = BTreeSet::new();
        let mut now_used: BTreeSet<LayerId> = BTreeSet::new();
        for (id, s) in &snaps {
            now_used.extend(s.layers.iter().copied());
            if self.seen.get(id) != Some(&s.layers) {
                fresh_layers.extend(s.layers.iter().filter(|l| !self.used_layers.contains(l)));
            }
        }
        self.dead_layers.retain(|(l, _)| !now_used.contains(l));
        let mut blobs = HashSet::new();
        if !fresh_layers.is_empty() {
            // A fresh handle: the pages of a layer written since the plan
            // are in an index this handle has not loaded.
            let now = repo.reopen()?;
            for l in &fresh_layers {
                layer_blobs(&now, l, &mut blobs)?;
            }
        }
        let mut keep: HashSet<PackId> = HashSet::new();
        // Indexes written since (a snapshot that finished meanwhile).
        let known: HashSet<IndexId> = self.index_files.iter().map(|f| IndexId(f.id)).collect();
        for i in repo.index_ids()? {
            if !known.contains(&i) && i.0 != self.new_index.id {
                for p in repo.read_index(&i)? {
                    keep.insert(p.id);
                    self.kept.insert(p.id);
                }
            }
        }
        // Blobs used again: find one copy the new index keeps, or re-adopt
        // the old pack that has it.
        let mut have: HashSet<BlobId> = HashSet::new();
        for p in self.packs.values().filter(|p| self.kept.contains(&p.id)) {
            have.extend(p.blobs.iter().map(|b| b.id));
        }
        for p in &self.new_packs {
            have.extend(p.index.blobs.iter().map(|b| b.id));
        }
        let mut readopt = Vec::new();
        for p in self.packs.values() {
            if self.kept.contains(&p.id) {
                continue;
            }
            if p.blobs
                .iter()
                .any(|b| blobs.contains(&b.id) && !have.contains(&b.id))
            {
                have.extend(p.blobs.iter().map(|b| b.id));
                keep.insert(p.id);
                readopt.push(p.clone());
            }
        }
        for list in [
            &mut self.delete_packs,
            &mut self.unindexed,
            &mut self.repacked,
        ] {
            list.retain(|id| !keep.contains(id));
        }
        Ok(readopt)
    }
}

/// Remove what no snapshot references. Packs whose unused share exceeds
/// `max_unused` (0.0–1.0) are repacked; wholly unused packs are deleted.
/// With `extra` (a dry-run forget's result) the analysis sees the
/// repository as that forget would leave it.
///
/// Backups are not held up for the whole run: the plan is made and the
/// new packs and index are written under a shared lock (snapshots keep
/// running); only the sweep takes the exclusive lock, waiting up to
/// `lock_wait` for running snapshots to finish, and first takes in
/// whatever changed since the plan (see `docs/DESIGN.md`, "Prune next to
/// running backups").
///
/// # Errors
/// Busy repository, or I/O failures (rerun to finish).
pub fn prune(
    repo: &Repo,
    max_unused: f64,
    dry_run: bool,
    extra: Option<(&Plan, &[(LayerId, Layer)])>,
) -> Result<PruneReport> {
    prune_waiting(
        repo,
        max_unused,
        dry_run,
        extra,
        std::time::Duration::from_secs(60),
    )
}

/// [`prune`] with the time the sweep waits for running snapshots.
///
/// # Errors
/// As [`prune`].
pub fn prune_waiting(
    repo: &Repo,
    max_unused: f64,
    dry_run: bool,
    extra: Option<(&Plan, &[(LayerId, Layer)])>,
    lock_wait: std::time::Duration,
) -> Result<PruneReport> {
    if dry_run {
        return Ok(plan_prune(repo, max_unused, extra)?.report);
    }
    let mut plan = {
        let _lock = crate::lock::shared_sole(repo, "prune (planning)", lock_wait)?;
        finish_plans(repo)?;
        let plan = plan_prune(repo, max_unused, None)?;
        if plan.idle {
            return Ok(plan.report);
        }
        // Additive: new packs, then an index listing them and every pack
        // that stays. Nothing is deleted yet.
        for p in &plan.new_packs {
            crate::failpoint::hit("prune-pack")?;
            repo.put(&p.file)?;
        }
        crate::failpoint::hit("prune-index")?;
        repo.put(&plan.new_index)?;
        plan
    };
    let _lock = crate::lock::exclusive_waiting(repo, "prune", lock_wait)?;
    // A forget that ran meanwhile may have left a plan; finish it first so
    // its layers count as used.
    finish_plans(repo)?;
    let readopt = plan.recheck(repo)?;
    // The index of re-adopted packs can be byte for byte an old index (a
    // snapshot's own index of the one pack it wrote): it must then stay.
    let readopted = match readopt.is_empty() {
        true => None,
        false => Some(repo.write_index(&readopt)?),
    };
    // What the sweep deletes after the recheck.
    plan.report.packs_deleted = plan.delete_packs.len();
    plan.report.packs_unindexed = plan.unindexed.len();
    plan.report.layers_deleted = plan.dead_layers.len();
    // Sweep, in an order that keeps every snapshot restorable at each step:
    // old indexes, then unreferenced layers and packs.
    for i in &plan.index_files {
        if i.id != plan.new_index.id && Some(IndexId(i.id)) != readopted {
            crate::failpoint::hit("prune-old-index")?;
            repo.delete_file(&IndexId(i.id))?;
        }
    }
    for (l, _) in &plan.dead_layers {
        crate::failpoint::hit("prune-layer")?;
        repo.delete_file(l)?;
    }
    for id in plan
        .repacked
        .iter()
        .chain(&plan.delete_packs)
        .chain(&plan.unindexed)
    {
        crate::failpoint::hit("prune-delete-pack")?;
        repo.delete_file(id)?;
    }
    Ok(plan.report)
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
    for (id, _) in repo.ids::<PackId>()? {
        report.packs += 1;
        let pack = repo.read_pack(&id)?;
        let data = pack.data;
        if !pack.intact {
            report.damaged_packs.push(id.short());
        }
        let blobs = match repo.parse_pack_tail(&data) {
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
                let ok = repo.decode_blob(b, raw).is_ok();
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
            repo.delete_file(&i)?;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paged_layer_written_after_the_plan_is_read_through_a_fresh_index() {
        use crate::layer::{DirKind, Entry, Meta};
        use crate::repo::{Protection, Snapshot};
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::init(&d.path().join("r"), &Protection::test("pw")).unwrap();
        // More than one page of entries at the default page size.
        let layer_of = |tag: &str| Layer {
            entries: std::iter::once(Entry {
                path: Vec::new(),
                node: Node::dir(DirKind::Merge),
                meta: Meta::default(),
                link: None,
            })
            .chain((0..crate::layer::PAGE_ENTRIES + 10).map(|i| Entry {
                path: format!("{tag}{i:06}").into_bytes(),
                node: Node::Symlink {
                    target: b"t".to_vec(),
                },
                meta: Meta::default(),
                link: None,
            }))
            .collect(),
        };
        let snap = |r: &Repo, lid| {
            r.write_snapshot(&Snapshot {
                time: Time { secs: 1, nanos: 0 },
                volume: "v".into(),
                hostname: "h".into(),
                tags: Vec::new(),
                parent: None,
                layers: vec![lid],
                summary: Default::default(),
            })
            .unwrap()
        };
        let first = repo.write_layer(&layer_of("a")).unwrap();
        snap(&repo, first);
        // The plan reads the first layer's pages: this handle's index is
        // loaded now.
        let mut plan = plan_prune(&repo, 0.0, None).unwrap();
        // Meanwhile another run stores a paged layer and its snapshot.
        let other = repo.reopen().unwrap();
        let second = other.write_layer(&layer_of("b")).unwrap();
        snap(&other, second);
        plan.recheck(&repo).unwrap();
    }

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

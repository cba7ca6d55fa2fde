//! Rotation: sealing the upper as a layer and moving the volume onto a
//! fresh one (gap-free beneath the old generation, or by remounting), with
//! recovery of interrupted rotations, merges of the live chain into fresh
//! layers, and offline folds.

use super::*;

/// Seal the upper and continue on a fresh one. The volume is never left
/// unmounted by a failure here.
///
/// On kernels that can mount beneath (6.5+), the new generation is swapped
/// in under the old one with no gap ([`overlay::swap_generation`]); readers
/// and processes whose cwd is in the volume keep a frozen view and do not
/// block. Files open for writing block the freeze: after `wait` the
/// snapshot fails naming them. A fold that is due, on an old kernel, or with
/// `strict_rotation`, rotates the 0.1 way (unmount, remount), which every
/// use of the volume blocks.
///
/// # Errors
/// Busy (after `wait`), or mount failures.
pub fn rotate(vol: &mut Volume, wait: Duration, tags: Vec<String>) -> Result<()> {
    recover_rotation(vol)?;
    vol.require_mounted()?;
    if vol.st.layers.len() + 1 >= 480 {
        bail!(
            "volume {} has {} unarchived local layers, close to the kernel's limit of 500: make the repository reachable so `laybak snapshot` can archive and fold them",
            vol.st.name,
            vol.st.layers.len()
        );
    }
    let beneath = gap_free(vol);
    // Gap-free rotations merge into fresh layers instead of folding; only a
    // fold that a crash interrupted needs the unmounted volume.
    let fold_due = if beneath {
        vol.st.folding.is_some() && fold_allowed(vol)?
    } else {
        fold_wanted(vol) && fold_allowed(vol)?
    };
    if beneath && !fold_due {
        match rotate_beneath(vol, wait, tags.clone())? {
            None => return Ok(()),
            Some(why) => {
                if std::env::var_os("LAYBAK_DEBUG").is_some() {
                    eprintln!("laybak: rotating by remount: {why:#}");
                }
            }
        }
    }
    // A fold rewrites bottom layers, which only an unmounted volume allows;
    // when the volume is in use, the fold waits for a quieter rotation.
    let first_wait = if fold_due && beneath {
        Duration::ZERO
    } else {
        wait
    };
    match rotate_remount(vol, first_wait, tags.clone()) {
        Err(e) if fold_due && beneath && e.downcast_ref::<Busy>().is_some() => {
            match rotate_beneath(vol, wait, tags)? {
                None => Ok(()),
                Some(e) => Err(e),
            }
        }
        r => r,
    }
}

/// Before a rotation, overlapped with opening the repository (the key
/// derivation takes half a second): write the volume's dirty data out and
/// drop its unused dentries, the work that would otherwise lengthen the
/// rotation. Only for gap-free volumes with a change to seal (an unchanged
/// volume is not rotated, and its users' dentry cache is left alone).
/// Holds the volume lock's caller's promise: nothing else rotates it now.
pub fn prepare_rotation(vol: &Volume) {
    if !gap_free(vol) || vol.st.rotating.is_some() || !vol.is_mounted().unwrap_or(false) {
        return;
    }
    let changed = crate::fsx::open_dir_path(&vol.layer_dir(vol.st.upper))
        .and_then(|d| crate::fsx::names(&d))
        .is_ok_and(|n| !n.is_empty());
    if !changed {
        return;
    }
    if let Ok(target) = overlay::Target::open(&vol.st.path) {
        overlay::prepare_rotation(&target, &format!("laybak:{}", vol.st.name));
    }
}

/// Whether this volume rotates by swapping generations (not strict, and a
/// kernel with the new mount API: `LAYBAK_FORCE_MOUNT2` stands for an old
/// one).
pub(super) fn gap_free(vol: &Volume) -> bool {
    !vol.st.strict_rotation && std::env::var_os("LAYBAK_FORCE_MOUNT2").is_none()
}

/// Finish or undo a generation swap that a crash interrupted, looking at
/// the real mount stack on the volume: the new generation on top (swap
/// done), beneath the frozen old one (detach it, then done), or nowhere
/// (thaw the old one, remove the new upper and workdir).
pub(super) fn recover_rotation(vol: &mut Volume) -> Result<()> {
    let Some(seq) = vol.st.rotating else {
        return Ok(());
    };
    let new_upper = vol.layer_dir(seq);
    let target = overlay::Target::open(&vol.st.path)?;
    let top = target
        .top_id()
        .ok()
        .and_then(|id| overlay::mount_by_id(id).ok().flatten());
    let text = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let canon = &vol.st.path;
    let beneath = overlay::parse_mountinfo(&text).into_iter().any(|m| {
        &m.target == canon
            && m.fstype == "overlay"
            && overlay::has_upper(&m.super_options, &new_upper)
    });
    let on_top = top
        .as_ref()
        .is_some_and(|m| overlay::has_upper(&m.super_options, &new_upper));
    let swapped = if on_top {
        true
    } else if beneath {
        // Crashed between mounting beneath and detaching: the old one on
        // top is frozen, so detaching it loses nothing.
        overlay::detach_top(&target)?;
        true
    } else {
        false
    };
    if swapped {
        let old = vol.st.upper;
        if let Some(merged) = advance(&mut vol.st, old, seq, Vec::new()) {
            retire(vol, &merged)?;
        }
        if let Some(id) = vol.st.rotating_old.take() {
            vol.st.old_gens.push(id);
        }
    } else {
        let ours = format!("laybak:{}", vol.st.name);
        if top
            .as_ref()
            .is_some_and(|m| m.fstype == "overlay" && m.source == ours && &m.target == canon)
        {
            overlay::thaw(&target);
        }
        discard_new_gen(vol, seq);
        discard_merge(vol);
    }
    vol.st.rotating = None;
    vol.st.rotating_old = None;
    vol.save()
}

/// Replace local layers `a` and `b` (adjacent, `a` below) by the merged
/// layer `f` in a state.
pub(super) fn apply_merge(st: &mut VolumeState, a: u64, b: u64, f: u64) {
    let Some(i) = st.layers.iter().position(|l| l.seq == a) else {
        return;
    };
    if st.layers.get(i + 1).is_none_or(|l| l.seq != b) {
        return;
    }
    let upper = st.layers.remove(i + 1);
    let lower = &mut st.layers[i];
    lower.seq = f;
    lower.archived.extend(upper.archived);
    lower.entries += upper.entries;
    lower.sealed = upper.sealed;
    lower.tags = upper.tags;
}

pub(super) fn discard_merge(vol: &mut Volume) {
    if let Some((_, _, f)) = vol.st.merging.take() {
        let _ = fs::remove_dir_all(vol.layer_dir(f));
    }
}

/// Move layer directories a merge replaced out of `l/` (a mount that
/// stacks them keeps them by reference, renaming does not disturb it).
pub(super) fn retire(vol: &mut Volume, seqs: &[u64]) -> Result<()> {
    let dir = vol.backing().join(STORE).join("retired");
    crate::backend::private_dirs(&dir)?;
    for &s in seqs {
        let from = vol.layer_dir(s);
        if from.exists() {
            fs::rename(&from, dir.join(s.to_string()))
                .with_context(|| format!("cannot retire {}", from.display()))?;
        }
        if !vol.st.retired.contains(&s) {
            vol.st.retired.push(s);
        }
    }
    Ok(())
}

/// Delete retired layer directories once no old generation and no
/// historical mount can stack them any more.
pub(super) fn sweep_retired(vol: &mut Volume) -> Result<()> {
    if vol.st.retired.is_empty() || !fold_allowed(vol)? {
        return Ok(());
    }
    let dir = vol.backing().join(STORE).join("retired");
    for s in std::mem::take(&mut vol.st.retired) {
        let p = dir.join(s.to_string());
        if p.exists() {
            fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    vol.save()
}

/// The cheapest adjacent pair of archived layers above the base to merge
/// (fewest entries together): merging costs their entries, never the base.
pub(super) fn merge_pick(vol: &Volume) -> Option<(u64, u64)> {
    let l = &vol.st.layers;
    let ok = |i: usize| !l[i].archived.is_empty() && !l[i + 1].archived.is_empty();
    (1..l.len().saturating_sub(1))
        .filter(|&i| ok(i))
        .min_by_key(|&i| l[i].entries + l[i + 1].entries)
        // Only the base and one layer: merging costs the base, but the
        // chain stays bounded.
        .or_else(|| (l.len() >= 2 && ok(0)).then_some(0))
        .map(|i| (l[i].seq, l[i + 1].seq))
}

/// Finish a rotation a crash interrupted (the first step of every
/// snapshot).
///
/// # Errors
/// State or mount errors.
pub fn finish_interrupted(vol: &mut Volume) -> Result<()> {
    recover_rotation(vol)
}

/// Build the merge the coming rotation will stack, when the chain is too
/// long (outside the quiesce hooks' window).
///
/// # Errors
/// State or mount errors.
pub fn prepare_merge_if_due(vol: &mut Volume) -> Result<()> {
    if gap_free(vol) && vol.is_mounted()? {
        prepare_merge(vol)?;
    }
    Ok(())
}

/// Build the merge for the coming rotation when the chain is too long.
/// A failure here only means no merge this time.
pub(super) fn prepare_merge(vol: &mut Volume) -> Result<()> {
    discard_merge(vol);
    if vol.st.layers.len() < vol.st.max_layers {
        return Ok(());
    }
    let Some((a, b)) = merge_pick(vol) else {
        return Ok(());
    };
    let f = vol.st.next_seq;
    vol.st.next_seq += 1;
    vol.st.merging = Some((a, b, f));
    vol.save()?;
    let out = vol.layer_dir(f);
    let _ = fs::remove_dir_all(&out);
    crate::backend::private_dirs(&out)?;
    crate::failpoint::hit("merge")?;
    if let Err(e) = fold::merge_into(&vol.layer_dir(a), &vol.layer_dir(b), &out) {
        discard_merge(vol);
        vol.save()?;
        if std::env::var_os("LAYBAK_DEBUG").is_some() {
            eprintln!("laybak: no merge this time: {e:#}");
        }
    }
    Ok(())
}

/// The state change of a rotation: the merge it stacks (if any) replaces
/// its two layers, `old` upper becomes the newest sealed layer, `seq` the
/// upper (with its own workdir). Returns the layers the merge replaced.
pub(super) fn advance(
    st: &mut VolumeState,
    old: u64,
    seq: u64,
    tags: Vec<String>,
) -> Option<[u64; 2]> {
    let merged = st.merging.take().map(|(a, b, f)| {
        apply_merge(st, a, b, f);
        [a, b]
    });
    st.layers.push(LocalLayer {
        seq: old,
        sealed: Time::now(),
        tags,
        archived: Vec::new(),
        writing: None,
        entries: 0,
    });
    st.upper = seq;
    st.work = Some(seq);
    st.next_seq = st.next_seq.max(seq + 1);
    merged
}

pub(super) fn discard_new_gen(vol: &Volume, seq: u64) {
    let _ = fs::remove_dir(vol.layer_dir(seq));
    let _ = fs::remove_dir_all(vol.gen_work_dir(seq));
}

/// The gap-free rotation. `Ok(None)`: done. `Ok(Some(why))`: this kernel
/// cannot do it, nothing changed, rotate the old way.
pub(super) fn rotate_beneath(
    vol: &mut Volume,
    wait: Duration,
    tags: Vec<String>,
) -> Result<Option<anyhow::Error>> {
    let target = overlay::Target::open(&vol.st.path)?;
    let live = target.top_id()?;
    let seq = vol.st.next_seq;
    let old_upper = vol.st.upper;
    new_layer_dir(&vol.layer_dir(seq), &vol.layer_dir(old_upper))?;
    let work = vol.gen_work_dir(seq);
    let _ = fs::remove_dir_all(&work);
    crate::backend::private_dirs(&work)?;
    vol.st.rotating = Some(seq);
    vol.st.rotating_old = overlay::gen_id(&target);
    vol.save()?;
    crate::failpoint::hit("before-unmount")?;
    let mut next = vol.st.clone();
    advance(&mut next, old_upper, seq, Vec::new());
    let spec = Volume {
        state_dir: vol.state_dir.clone(),
        st: next,
    }
    .spec();
    let undo = |vol: &mut Volume| -> Result<()> {
        discard_new_gen(vol, seq);
        discard_merge(vol);
        vol.st.rotating = None;
        vol.st.rotating_old = None;
        vol.save()
    };
    match overlay::swap_generation(&spec, &target, live, wait) {
        Ok((new_id, old)) => {
            crate::failpoint::hit("unmounted")?;
            let prev_work = vol.st.work;
            if let Some(merged) = advance(&mut vol.st, old_upper, seq, tags) {
                retire(vol, &merged)?;
            }
            vol.st.rotating = None;
            vol.st.rotating_old = None;
            vol.st.old_gens.push(old.id);
            vol.save()?;
            crate::failpoint::hit("state-rotated")?;
            drop(old.release_in_background());
            overlay::verify_id(new_id, &vol.st.path)?;
            remove_stale_workdirs(vol, prev_work);
            // Forget old generations nobody is inside any more (the one just
            // detached is held only by this process until it exits).
            let before = vol.st.old_gens.len();
            prune_old_gens(vol);
            if vol.st.old_gens.len() != before {
                vol.save()?;
            }
            sweep_retired(vol)?;
            crate::failpoint::hit("remounted")?;
            Ok(None)
        }
        Err(overlay::SwapError::Unsupported(e)) => {
            undo(vol)?;
            Ok(Some(e))
        }
        Err(overlay::SwapError::Writers) => {
            undo(vol)?;
            let w = overlay::writers(&vol.st.path);
            let list = if w.is_empty() {
                "no process found in /proc (a bind mount in another namespace?)".to_string()
            } else {
                w.iter()
                    .map(|(p, c, what)| format!("pid {p} ({c}): {what}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            Err(Busy(format!(
                "{} has files open for writing after waiting {}s: {list}; close them (stop the service) or raise --wait",
                vol.st.path.display(),
                wait.as_secs()
            ))
            .into())
        }
        Err(overlay::SwapError::Failed(e)) => {
            undo(vol)?;
            Err(e)
        }
        Err(overlay::SwapError::Stuck(e)) => Err(e.context(format!(
            "the new generation of {} is mounted beneath the frozen old one; run `laybak up {}` to finish the swap",
            vol.st.name,
            vol.st.path.display()
        ))),
    }
}

/// Workdirs of generations before the previous one: nothing writes to them
/// (their superblocks are read-only), so they go.
pub(super) fn remove_stale_workdirs(vol: &Volume, prev: Option<u64>) {
    let dir = vol.backing().join(STORE).join("w");
    let Ok(rd) = fs::read_dir(&dir) else { return };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().parse::<u64>().ok();
        if n.is_some() && n != vol.st.work && n != prev {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Rotation by unmount and remount (0.1): a gap of a few milliseconds, and
/// any use of the volume blocks it.
pub(super) fn rotate_remount(vol: &mut Volume, wait: Duration, tags: Vec<String>) -> Result<()> {
    discard_merge(vol);
    let old = vol.st.clone();
    crate::failpoint::hit("before-unmount")?;
    overlay::unmount_wait(&vol.st.path, wait)?;
    crate::failpoint::hit("unmounted")?;
    let res = (|| -> Result<()> {
        let seq = vol.st.next_seq;
        new_layer_dir(&vol.layer_dir(seq), &vol.layer_dir(vol.st.upper))?;
        vol.st.layers.push(LocalLayer {
            seq: vol.st.upper,
            sealed: Time::now(),
            tags,
            archived: Vec::new(),
            writing: None,
            entries: 0,
        });
        vol.st.upper = seq;
        vol.st.next_seq = seq + 1;
        vol.save()?;
        crate::failpoint::hit("state-rotated")?;
        fold_if_needed(vol)?;
        overlay::mount(&vol.spec(), &vol.st.path)?;
        crate::failpoint::hit("remounted")
    })();
    if let Err(e) = res {
        if !vol.is_mounted().unwrap_or(false) {
            // A fold rewrites the bottom layers, so once one started only
            // the new layout (which the state now describes) is valid.
            let folded = vol.st.layers.len() != old.layers.len() + 1 || vol.st.folding.is_some();
            if !folded {
                // Put the old layout back; the sealed upper is untouched.
                vol.st = old;
                let _ = vol.save();
            }
            if let Err(e2) = overlay::mount(&vol.spec(), &vol.st.path) {
                return Err(e.context(format!(
                    "and remounting failed too ({e2:#}); run `laybak up {}`",
                    vol.st.path.display()
                )));
            }
        }
        return Err(e);
    }
    Ok(())
}

/// Forget old generations nobody is inside any more. A superblock device
/// is unique among live superblocks, so an entry whose device the live
/// generation now has is long dead (its device number was reused).
pub(super) fn prune_old_gens(vol: &mut Volume) {
    let live = overlay::Target::open(&vol.st.path)
        .ok()
        .and_then(|t| overlay::gen_id(&t))
        .map(|g| g.1);
    vol.st.old_gens.retain(|&g| {
        let g = if Some(g.1) == live { (g.0, 0) } else { g };
        !overlay::mount_users(g).is_empty()
    });
}

/// Fail (exit 11) naming the processes still inside old generations of the
/// volume (frozen views left by gap-free rotations).
pub(super) fn refuse_if_old_gens_used(vol: &mut Volume, what: &str) -> Result<()> {
    prune_old_gens(vol);
    let users: Vec<(u32, String)> = vol
        .st
        .old_gens
        .iter()
        .flat_map(|&g| overlay::mount_users(g))
        .collect();
    vol.save()?;
    if users.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = users
        .iter()
        .map(|(p, c)| format!("pid {p} ({c})"))
        .collect();
    Err(Busy(format!(
        "{what} of {} has to wait: processes are still inside an earlier, frozen view of it (their working directory or open files): {}; end them or let them leave the directory",
        vol.st.path.display(),
        list.join(", ")
    ))
    .into())
}

/// Whether the chain is long enough for a fold.
pub(super) fn fold_wanted(vol: &Volume) -> bool {
    // Counted with the layer this rotation seals.
    vol.st.folding.is_some()
        || (vol.st.layers.len() + 1 > vol.st.max_layers
            && vol.st.layers.len() >= 2
            && !vol.st.layers[0].archived.is_empty()
            && !vol.st.layers[1].archived.is_empty())
}

/// Whether folding may change the bottom layers now: no historical mount
/// stacks them and no process is still inside an old generation. Forgets
/// old generations nobody uses any more.
pub(super) fn fold_allowed(vol: &mut Volume) -> Result<bool> {
    let before = vol.st.old_gens.len();
    prune_old_gens(vol);
    if vol.st.old_gens.len() != before {
        vol.save()?;
    }
    Ok(vol.st.old_gens.is_empty()
        && crate::mounts::using_volume(&vol.state_dir, &vol.st.name)?.is_empty())
}

/// Fold the bottom two archived layers while the volume is unmounted, when
/// the chain is longer than `max_layers`. Costs the size of the second
/// layer (renames only), not of the tree.
pub(super) fn fold_if_needed(vol: &mut Volume) -> Result<()> {
    if let Some((up, low)) = vol.st.folding {
        finish_fold(vol, up, low)?;
    }
    // Never rewrite a layer under a historical mount: the fold waits until
    // those mounts are gone (the chain is a little longer meanwhile).
    if !fold_allowed(vol)? {
        return Ok(());
    }
    while vol.st.layers.len() > vol.st.max_layers
        && vol.st.layers.len() >= 2
        && !vol.st.layers[0].archived.is_empty()
        && !vol.st.layers[1].archived.is_empty()
    {
        let (low, up) = (vol.st.layers[0].seq, vol.st.layers[1].seq);
        if fold::has_redirects(&vol.layer_dir(up))? {
            // Not in place: merge the cheapest pair above the base into a
            // fresh layer (the cost of two layers), or, with only the base
            // below, build a fresh base (the cost of the tree).
            match merge_pick(vol) {
                Some((a, b)) if a != low => build_now(vol, a, b, false)?,
                _ => build_now(vol, low, up, true)?,
            }
            continue;
        }
        vol.st.folding = Some((up, low));
        vol.save()?;
        finish_fold(vol, up, low)?;
    }
    Ok(())
}

/// Replace adjacent layers `low` and `up` by one built fresh by hard links
/// with the rule restore uses ([`fold::build`]; `bottom`: `low` is the
/// base). Used instead of the fold by renames when a layer holds renamed
/// directories, since the kernel leaves offline changes to redirected
/// layers undefined. Recorded as a merge, so that a crash leaves either the
/// old pair or the new layer, never a mix.
fn build_now(vol: &mut Volume, low: u64, up: u64, bottom: bool) -> Result<()> {
    discard_merge(vol);
    let f = vol.st.next_seq;
    vol.st.next_seq += 1;
    vol.st.merging = Some((low, up, f));
    vol.save()?;
    let out = vol.layer_dir(f);
    let _ = fs::remove_dir_all(&out);
    crate::backend::private_dirs(&out)?;
    if let Err(e) = fold::build(&[&vol.layer_dir(low), &vol.layer_dir(up)], &out, bottom) {
        discard_merge(vol);
        vol.save()?;
        return Err(e);
    }
    crate::failpoint::hit("fold")?;
    apply_merge(&mut vol.st, low, up, f);
    vol.st.merging = None;
    vol.save()?;
    for s in [low, up] {
        let d = vol.layer_dir(s);
        fs::remove_dir_all(&d).with_context(|| format!("cannot remove {}", d.display()))?;
    }
    Ok(())
}

pub(super) fn finish_fold(vol: &mut Volume, up: u64, low: u64) -> Result<()> {
    crate::failpoint::hit("fold")?;
    let (u, l) = (vol.layer_dir(up), vol.layer_dir(low));
    if u.exists() {
        fold::fold(&u, &l)?;
        fs::remove_dir(&u)?;
    }
    if let Some(pos) = vol.st.layers.iter().position(|x| x.seq == up) {
        let merged = vol.st.layers.remove(pos);
        if let Some(base) = vol.st.layers.iter_mut().find(|x| x.seq == low) {
            base.archived.extend(merged.archived);
        }
    }
    vol.st.folding = None;
    vol.save()
}

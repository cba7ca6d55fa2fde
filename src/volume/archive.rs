//! Archiving the pending sealed layers of a volume, one snapshot each.

use super::*;

pub use crate::archive::Archived;

/// Refuse a plaintext repository where this volume once archived to an
/// encrypted one (its config and keys were replaced, or `--repo` points
/// elsewhere): nothing of the volume may be written in the clear.
///
/// # Errors
/// That case.
pub fn check_protection(vol: &Volume, repo: &Repo) -> Result<()> {
    if vol.st.repo_encrypted && !repo.is_encrypted() {
        bail!(
            "{} was encrypted when volume {} last archived to it and is plaintext now (its config was replaced, or --repo points elsewhere): nothing was written",
            repo.location.display(),
            vol.st.name
        );
    }
    Ok(())
}

/// Archive every pending sealed layer of `vol` in order, one snapshot each.
///
/// # Errors
/// Scan or repository failure; already archived layers stay archived and
/// the rest stay pending for the next run.
pub fn archive_pending(
    vol: &mut Volume,
    repo: &Repo,
    progress: bool,
    lock_wait: Duration,
) -> Result<Vec<Archived>> {
    let mut out = Vec::new();
    if vol.st.layers.iter().all(|l| !l.archived.is_empty()) {
        return Ok(out);
    }
    check_protection(vol, repo)?;
    if repo.is_encrypted() && !vol.st.repo_encrypted {
        vol.st.repo_encrypted = true;
        vol.save()?;
    }
    // Shared: prune (exclusive) must not delete what we are adding.
    let _lock = crate::lock::shared(repo, &format!("snapshot of {}", vol.st.name), lock_wait)?;
    for i in 0..vol.st.layers.len() {
        if !vol.st.layers[i].archived.is_empty() {
            continue;
        }
        if let Some((lid, id)) = vol.st.layers[i].writing
            && repo.contains(&id)?
            && repo.contains(&lid)?
        {
            // A previous run wrote the record and crashed before noting it.
            let snap = repo.read_snapshot(&id)?;
            vol.st.layers[i].archived = vec![lid];
            vol.st.layers[i].writing = None;
            vol.st.last_snapshot = Some(id);
            vol.save()?;
            out.push(Archived { id, snap });
            continue;
        }
        let dir = vol.layer_dir(vol.st.layers[i].seq);
        let source = if i == 0 { Source::Base } else { Source::Upper };
        let record = crate::archive::Record {
            volume: vol.st.name.clone(),
            time: vol.st.layers[i].sealed,
            tags: vol.st.layers[i].tags.clone(),
            parent: vol.st.last_snapshot,
            below: below_layers(vol, repo, i)?,
        };
        let state_dir = vol.state_dir.clone();
        let done = crate::archive::archive_layer(
            repo,
            &dir,
            source,
            Some(&state_dir),
            record,
            progress,
            |layer, snap| {
                vol.st.layers[i].writing = Some((*layer, *snap));
                vol.save()
            },
        )
        .with_context(|| {
            format!(
                "archiving layer {} of volume {}",
                vol.st.layers[i].seq, vol.st.name
            )
        })?;
        let (id, snap) = (done.id, done.snap);
        let layer_id = *snap.layers.last().expect("the new layer");
        vol.st.layers[i].archived = vec![layer_id];
        vol.st.layers[i].writing = None;
        vol.st.layers[i].entries = snap.summary.entries;
        vol.st.last_snapshot = Some(id);
        vol.save()?;
        out.push(Archived { id, snap });
    }
    Ok(out)
}

/// The repository layers under local layer `i`: the previous snapshot's
/// layers as the repository has them now (`forget` may have squashed them),
/// or, for the first snapshot, the local record.
pub(super) fn below_layers(vol: &Volume, repo: &Repo, i: usize) -> Result<Vec<LayerId>> {
    if i == 0 {
        return Ok(Vec::new());
    }
    // A record that cannot be read is an error, never "forgotten".
    if let Some(parent) = vol.st.last_snapshot
        && repo.contains(&parent)?
    {
        return Ok(repo.read_snapshot(&parent)?.layers);
    }
    let mut layers = Vec::new();
    for l in &vol.st.layers[..i] {
        for &id in &l.archived {
            if !repo.contains(&id)? {
                bail!(
                    "the previous snapshot of volume {} is gone from the repository and so is layer {}: this volume's history cannot be continued in this repository; detach and attach it again",
                    vol.st.name,
                    id.short()
                );
            }
            layers.push(id);
        }
    }
    Ok(layers)
}

/// A snapshot of a volume in which nothing changed since its last snapshot,
/// without a rotation: when the upper directory is empty and its root has
/// the metadata the previous layer's root has, the view is the previous
/// snapshot's, so the new record names the same layers (nothing is sealed,
/// nothing is scanned, no generation is swapped). Returns `None` when the
/// volume changed or its state is not plain (pending layers, a fold or
/// merge under way, quiesce hooks — a `before` hook may itself write what
/// is to be snapshotted — or a previous snapshot the repository lacks);
/// the caller then takes the snapshot the full way.
///
/// # Errors
/// State, filesystem or repository failures.
pub fn snapshot_unchanged(
    vol: &mut Volume,
    repo: &Repo,
    tags: &[String],
    lock_wait: Duration,
) -> Result<Option<Archived>> {
    let st = &vol.st;
    if st.hooks.is_some()
        || st.folding.is_some()
        || st.merging.is_some()
        || st.rotating.is_some()
        || st.layers.iter().any(|l| l.archived.is_empty())
        || !vol.is_mounted()?
    {
        return Ok(None);
    }
    let (Some(parent), Some(top)) = (st.last_snapshot, st.layers.last()) else {
        return Ok(None);
    };
    check_protection(vol, repo)?;
    let st = &vol.st;
    let upper = crate::fsx::open_dir_path(&vol.layer_dir(st.upper))?;
    if !crate::fsx::names(&upper)?.is_empty() {
        return Ok(None);
    }
    let below = crate::fsx::open_dir_path(&vol.layer_dir(top.seq))?;
    let meta = |fd: &rustix::fd::OwnedFd| -> Result<_> {
        let s = rustix::fs::fstat(fd)?;
        let x: Vec<_> = crate::fsx::xattrs_fd(fd)?
            .into_iter()
            .filter(|(k, _)| crate::ovl::is_plain_user(k))
            .collect();
        Ok((
            s.st_mode,
            s.st_uid,
            s.st_gid,
            s.st_mtime,
            s.st_mtime_nsec,
            x,
        ))
    };
    if meta(&upper)? != meta(&below)? {
        return Ok(None);
    }
    let _lock = crate::lock::shared(repo, &format!("snapshot of {}", st.name), lock_wait)?;
    if !repo.contains(&parent)? {
        return Ok(None);
    }
    let prev = repo.read_snapshot(&parent)?;
    let snap = Snapshot {
        time: Time::now(),
        volume: st.name.clone(),
        hostname: Repo::hostname(),
        tags: tags.to_vec(),
        parent: Some(parent),
        layers: prev.layers,
        summary: Default::default(),
    };
    let sealed = repo.seal_snapshot(&snap)?;
    let id = SnapshotId(sealed.id);
    repo.put(&sealed)
        .context("the snapshot record was not written")?;
    vol.st.last_snapshot = Some(id);
    vol.save()?;
    // The housekeeping a rotation would have done: old generations nobody
    // is inside are forgotten, and the layers earlier merges retired go
    // once no old generation or historical mount stacks them.
    let before = vol.st.old_gens.len();
    prune_old_gens(vol);
    if vol.st.old_gens.len() != before {
        vol.save()?;
    }
    sweep_retired(vol)?;
    Ok(Some(Archived { id, snap }))
}

//! Archiving the pending sealed layers of a volume, one snapshot each.

use super::*;

pub use crate::archive::Archived;

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

//! How a volume's layers relate to the repository: `status` (what changed
//! since the last snapshot) and which local layer directories a snapshot's
//! layers are (for instant historical mounts), kept across `forget`.

use super::*;

/// One line of `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// `added`, `modified`, `deleted` or `replaced` (an opaque directory).
    pub change: &'static str,
    /// Path inside the volume (lossy UTF-8).
    pub path: String,
}

/// `lstat` of the relative path `comps` inside the open directory `dir`,
/// descriptor by descriptor (paths may exceed PATH_MAX).
pub(super) fn lookup_in(dir: rustix::fd::OwnedFd, comps: &[&[u8]]) -> Option<rustix::fs::Stat> {
    let (last, parents) = comps.split_last()?;
    let mut d = dir;
    for c in parents {
        d = crate::fsx::open_subdir(&d, c).ok()?;
    }
    crate::fsx::stat_at(&d, last).ok().flatten()
}

pub(super) fn exists_below(vol: &Volume, path: &[u8]) -> bool {
    use crate::fsx::{is_dir, is_whiteout, open_subdir, stat_at, xattrs_fd};
    let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    'layers: for l in vol.st.layers.iter().rev() {
        let Ok(mut dir) = crate::fsx::open_dir_path(&vol.layer_dir(l.seq)) else {
            continue;
        };
        for (i, c) in comps.iter().enumerate() {
            let Some(st) = stat_at(&dir, c).ok().flatten() else {
                continue 'layers;
            };
            if is_whiteout(&st) {
                return false;
            }
            if i + 1 == comps.len() {
                return true;
            }
            if !is_dir(&st) {
                return false;
            }
            let Ok(sub) = open_subdir(&dir, c) else {
                continue 'layers;
            };
            let xattrs = xattrs_fd(&sub).unwrap_or_default();
            if crate::ovl::is_opaque(xattrs.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))) {
                // Opaque: nothing further down is visible; look only here.
                return lookup_in(sub, &comps[i + 1..]).is_some_and(|m| !is_whiteout(&m));
            }
            dir = sub;
        }
    }
    false
}

/// What changed since the last snapshot, read from the upper directory (and,
/// for each changed path only, a lookup in the layers below).
///
/// # Errors
/// The volume is not mounted, or the upper is unreadable.
pub fn status(vol: &Volume) -> Result<Vec<Change>> {
    vol.require_mounted()?;
    let found = scan::walk(&vol.layer_dir(vol.st.upper), Source::Upper)?;
    let mut out = Vec::new();
    for f in found.iter().skip(1) {
        let e = &f.entry;
        let below = exists_below(vol, &e.path);
        let change = match &e.node {
            crate::layer::Node::Whiteout => "deleted",
            crate::layer::Node::Dir {
                kind: crate::layer::DirKind::Opaque,
            } if below => "replaced",
            crate::layer::Node::Dir { .. } if below => continue,
            _ if below => "modified",
            _ => "added",
        };
        out.push(Change {
            change,
            path: crate::layer::show(&e.path),
        });
    }
    Ok(out)
}

/// Local layer directories that hold a prefix of a snapshot's layers.
#[derive(Debug, Default, Clone)]
pub struct LocalChain {
    /// Directories, bottom first.
    pub dirs: Vec<PathBuf>,
    /// Their seqs in the volume.
    pub seqs: Vec<u64>,
    /// How many of the snapshot's layers they cover.
    pub used: usize,
}

/// Directories for the layers of `snap` that this host still has locally,
/// as a prefix of the snapshot's layer list.
pub fn local_layers_for(vols: &[Volume], snap: &Snapshot) -> LocalChain {
    let Some(vol) = vols.iter().find(|v| v.st.name == snap.volume) else {
        return LocalChain::default();
    };
    // A half-done fold has rewritten the bottom layer: not a view of any
    // snapshot until it is finished.
    if !vol.backing_mounted().unwrap_or(false) || vol.st.folding.is_some() {
        return LocalChain::default();
    }
    let mut dirs = Vec::new();
    let mut seqs = Vec::new();
    let mut used = 0;
    let mut k = 0;
    // Each snapshot layer must be exactly a run of local directories, once
    // squashed ids are expanded into the layers they replaced.
    for l in &snap.layers {
        let mut want = Vec::new();
        expand(&vol.st.aliases, l, &mut want, 0);
        let mut got: Vec<LayerId> = Vec::new();
        let start = k;
        while got.len() < want.len()
            && k < vol.st.layers.len()
            && !vol.st.layers[k].archived.is_empty()
        {
            got.extend(vol.st.layers[k].archived.iter().cloned());
            k += 1;
        }
        if got != want {
            break;
        }
        dirs.extend(vol.st.layers[start..k].iter().map(|x| vol.layer_dir(x.seq)));
        seqs.extend(vol.st.layers[start..k].iter().map(|x| x.seq));
        used += 1;
    }
    LocalChain { dirs, seqs, used }
}

pub(super) fn expand(
    aliases: &std::collections::BTreeMap<LayerId, Vec<LayerId>>,
    id: &LayerId,
    out: &mut Vec<LayerId>,
    depth: usize,
) {
    match aliases.get(id) {
        Some(src) if depth < 64 => {
            for s in src {
                expand(aliases, s, out, depth + 1);
            }
        }
        _ => out.push(*id),
    }
}

/// After a forget on this host, remember which squashed layers replace
/// layers this host keeps locally (so historical mounts stay instant), and
/// drop what no snapshot needs any more. Volumes busy with another laybak
/// are skipped: their mounts then use the repository cache.
///
/// # Errors
/// State files cannot be written.
pub fn note_squashed(
    state_dir: &Path,
    repo: &Repo,
    squashed: &[crate::reclaim::Squashed],
) -> Result<()> {
    if squashed.is_empty() {
        return Ok(());
    }
    let snaps = repo.snapshots_tolerant()?.0;
    for mut vol in all(state_dir)? {
        // Only this host's history of the volume (another host's volume
        // may have the same name).
        let host = Repo::hostname();
        let mine: Vec<_> = squashed
            .iter()
            .filter(|q| q.volume == vol.st.name && q.host == host)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let Ok(_lock) = vol.try_lock() else { continue };
        for q in mine {
            vol.st.aliases.insert(q.layer, q.from.clone());
        }
        // Keep only aliases reachable from this volume's snapshots.
        let mut reach: HashSet<LayerId> = HashSet::new();
        let mut todo: Vec<LayerId> = snaps
            .iter()
            .filter(|(_, s)| s.volume == vol.st.name && s.hostname == host)
            .flat_map(|(_, s)| s.layers.iter().copied())
            .collect();
        while let Some(id) = todo.pop() {
            if reach.insert(id)
                && let Some(src) = vol.st.aliases.get(&id)
            {
                todo.extend(src.iter().cloned());
            }
        }
        vol.st.aliases.retain(|k, _| reach.contains(k));
        vol.save()?;
    }
    Ok(())
}

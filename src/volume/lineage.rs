//! How a volume's layers relate to the repository: `status` (what changed
//! since the last snapshot) and which local layer directories a snapshot's
//! layers are (for instant historical mounts), kept across `forget`.

use super::*;

/// One line of `status`.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// `added`, `modified`, `deleted`, `replaced` (an opaque directory) or
    /// `renamed` (a directory moved in place).
    pub change: &'static str,
    /// Path inside the volume (lossy UTF-8).
    pub path: String,
    /// For `renamed`: where the directory was at the last snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// What changed since the last snapshot, read from the upper directory: each
/// of its entries is looked up in the layers below with the overlay rule
/// ([`crate::stack`]), where the entry continues there (a renamed
/// directory's content is elsewhere below). Costs the change, not the tree.
///
/// # Errors
/// The volume is not mounted, or a layer is unreadable.
pub fn status(vol: &Volume) -> Result<Vec<Change>> {
    use crate::layer::{DirKind, Node, show};
    use crate::stack::{self, Model};
    vol.require_mounted()?;
    let upper = vol.layer_dir(vol.st.upper);
    let found = scan::walk(&upper, Source::Upper)?;
    let top = fold::Dirs::open(&[&upper])?;
    let over = Model::new(&top, true);
    let lowers: Vec<PathBuf> = vol.st.layers.iter().map(|l| vol.layer_dir(l.seq)).collect();
    let refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    let low = fold::Dirs::open(&refs)?;
    let below = Model::new(&low, false);
    // Where an upper path is in the namespace below: its parent's
    // continuation plus its name (`None`: the parent hides what is below).
    let at_below = |path: &[u8]| -> Option<Vec<u8>> {
        let (par, name) = crate::layer::split(path);
        let s = over.resolve(par);
        stack::below(&s).map(|p| stack::join(p, name))
    };
    let exists = |at: &Option<Vec<u8>>| at.as_ref().is_some_and(|p| !below.resolve(p).is_empty());
    let mut out = Vec::new();
    let mut sources = std::collections::HashSet::new();
    // (index in `out`, where below) of each deletion.
    let mut deleted: Vec<(usize, Vec<u8>)> = Vec::new();
    for f in found.iter().skip(1) {
        let e = &f.entry;
        let at = at_below(&e.path);
        let change = match &e.node {
            Node::Whiteout if exists(&at) => {
                deleted.push((out.len(), at.clone().unwrap_or_default()));
                "deleted"
            }
            Node::Whiteout => continue,
            Node::Dir {
                kind: DirKind::Redirect(_),
            } => {
                let s = over.resolve(&e.path);
                let from = stack::below(&s).map(<[u8]>::to_vec);
                if let Some(from) = &from {
                    sources.insert(from.clone());
                }
                if from != at {
                    out.push(Change {
                        change: "renamed",
                        path: show(&e.path),
                        from: from.as_deref().map(show),
                    });
                }
                continue;
            }
            Node::Dir {
                kind: DirKind::Opaque,
            } if exists(&at) => "replaced",
            Node::Dir { .. } if exists(&at) => continue,
            _ if exists(&at) => "modified",
            _ => "added",
        };
        out.push(Change {
            change,
            path: show(&e.path),
            from: None,
        });
    }
    top.check()?;
    low.check()?;
    // The whiteout a rename leaves at the old name is part of the rename.
    let moved: std::collections::HashSet<usize> = deleted
        .into_iter()
        .filter(|(_, at)| sources.contains(at))
        .map(|(i, _)| i)
        .collect();
    Ok(out
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !moved.contains(i))
        .map(|(_, c)| c)
        .collect())
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

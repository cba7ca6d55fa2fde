//! Historical (read-only) snapshot mounts: assembling the chain, the layer
//! cache, and the records that let laybak unmount only what it mounted and
//! never change a layer that such a mount uses.
//!
//! ```text
//! STATE/mounts/<mount id>.json   one record per live `laybak mount`
//! STATE/cache/<layer id>[.k]     layers materialized from the repository
//! STATE/empty                    an empty lower for single-layer views
//! ```
//!
//! A record names the mount id the kernel gave the mount, its target, and
//! the local layer directories it stacks. It is live while a mount with that
//! id, laybak's source tag and that target exists; otherwise it is stale and
//! removed by whoever meets it. Folding (`volume`) and `detach` consult the
//! live records: a fold never rewrites a layer a live mount uses, and
//! detach refuses while one exists.

use crate::format::{Id, LayerId, SnapshotId};
use crate::layer::Layer;
use crate::overlay::{self, Target};
use crate::repo::{Repo, Snapshot};
use crate::volume;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Source tag of every historical mount (mountinfo shows it).
pub const SOURCE_PREFIX: &str = "laybak-snapshot:";

/// A live historical mount.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountRecord {
    /// Mount id the kernel gave it.
    pub id: u64,
    /// Where it is mounted.
    pub target: PathBuf,
    /// Snapshot shown.
    pub snapshot: String,
    /// Volume of that snapshot.
    pub volume: String,
    /// Local layer directories (seqs of `volume`) it stacks.
    pub local: Vec<u64>,
    /// Cache directories (names under `STATE/cache`) it stacks.
    pub cache: Vec<String>,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("mounts")
}

/// Live mount records; stale ones are removed.
///
/// # Errors
/// The records cannot be read.
pub fn live(state_dir: &Path) -> Result<Vec<MountRecord>> {
    let d = dir(state_dir);
    let rd = match fs::read_dir(&d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", d.display())),
    };
    let mut out = Vec::new();
    for ent in rd {
        let p = ent?.path();
        if p.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Ok(rec) = fs::read(&p)
            .map_err(anyhow::Error::from)
            .and_then(|d| Ok(serde_json::from_slice::<MountRecord>(&d)?))
        else {
            let _ = fs::remove_file(&p);
            continue;
        };
        // By id and laybak's source tag only: renaming the directory (or
        // one above it) must not make laybak forget the mount.
        let alive = overlay::mount_by_id(rec.id)?
            .is_some_and(|m| m.source.starts_with(SOURCE_PREFIX) && m.fstype == "overlay");
        if alive {
            out.push(rec);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
    out.sort_by_key(|r| r.id);
    Ok(out)
}

/// Live mounts that stack local layers of volume `name`.
///
/// # Errors
/// The records cannot be read.
pub fn using_volume(state_dir: &Path, name: &str) -> Result<Vec<MountRecord>> {
    Ok(live(state_dir)?
        .into_iter()
        .filter(|r| r.volume == name && !r.local.is_empty())
        .collect())
}

/// Mount snapshot `snap` read-only (`ro,nosuid,nodev`) at `target`, using
/// the volume's local layers where they hold exactly the snapshot's layers
/// and the cache for the rest; record it.
///
/// # Errors
/// Bad target, repository errors, or the kernel refused.
pub fn mount_snapshot(
    state_dir: &Path,
    repo: &Repo,
    id: &SnapshotId,
    snap: &Snapshot,
    target: &Path,
) -> Result<()> {
    if !target.exists() {
        crate::fsx::create_dirs_trusted(target, 0o755)
            .with_context(|| format!("cannot create {}", target.display()))?;
    }
    let t = Target::open_held(target)?;
    let listing = crate::fsx::open_beneath(
        t.dir()?,
        b"",
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
    )
    .and_then(crate::fsx::names)
    .with_context(|| format!("cannot read {}", target.display()))?;
    if !listing.is_empty() {
        bail!(
            "mount point {} must be an empty directory",
            target.display()
        );
    }
    let canon = fs::canonicalize(target)?;
    let vols = volume::all(state_dir)?;
    let local = volume::local_layers_for(&vols, snap);
    let mut lowers = local.dirs.clone();
    let mut cache = Vec::new();
    for lid in &snap.layers[local.used..] {
        // A layer can appear twice in a chain (two snapshots without any
        // change have identical manifests); overlay refuses one directory
        // twice, so later occurrences get their own copy.
        let hex = lid.hex();
        let before = cache
            .iter()
            .filter(|c: &&String| c.split('.').next() == Some(hex.as_str()))
            .count();
        let name = if before == 0 {
            hex
        } else {
            format!("{hex}.{before}")
        };
        let layer: Layer = repo.read_layer(lid)?;
        lowers.push(cached_layer(state_dir, repo, &name, lid, &layer)?);
        cache.push(name);
    }
    if lowers.len() == 1 {
        // Overlay needs two lowers without an upper.
        lowers.insert(0, empty_dir(state_dir)?);
    }
    lowers.reverse();
    let spec = overlay::Spec {
        lowers,
        upper: None,
        source: format!("{SOURCE_PREFIX}{}", id.short()),
    };
    let mid = overlay::mount_at(&spec, &t)?;
    // Where it really is (the name may have changed since it was checked).
    let at = overlay::mount_by_id(mid)?.map_or(canon, |m| m.target);
    let rec = MountRecord {
        id: mid,
        target: at,
        snapshot: id.hex(),
        volume: snap.volume.clone(),
        local: local.seqs,
        cache,
    };
    let res = (|| -> Result<()> {
        crate::fsx::private_dir(&dir(state_dir))?;
        let p = dir(state_dir).join(format!("{mid}.json"));
        crate::backend::atomic_write(&p, &serde_json::to_vec_pretty(&rec)?, 0)
            .with_context(|| format!("cannot write {}", p.display()))?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = overlay::unmount_id(mid, &t);
        return Err(e);
    }
    Ok(())
}

/// Unmount a historical mount that laybak made at `target`; anything else
/// mounted there is refused.
///
/// # Errors
/// Not a laybak snapshot mount, or busy.
pub fn umount(state_dir: &Path, target: &Path) -> Result<()> {
    let t = Target::open(target)?;
    let top = t.top_id()?;
    let rec = live(state_dir)?.into_iter().find(|r| r.id == top);
    let Some(rec) = rec else {
        let canon = fs::canonicalize(target).unwrap_or_default();
        if volume::all(state_dir)?.iter().any(|v| v.st.path == canon) {
            bail!(
                "{} is a volume, not a snapshot mount: use `laybak down`",
                canon.display()
            );
        }
        match overlay::mount_by_id(top)?.filter(|m| m.target == canon) {
            None => bail!("nothing is mounted at {}", target.display()),
            Some(m) => bail!(
                "{} holds a {} mount that `laybak mount` did not make: laybak unmounts only its own snapshot mounts",
                target.display(),
                m.fstype
            ),
        }
    };
    overlay::unmount_id(rec.id, &t).map_err(|e| {
        if e.chain()
            .any(|c| c.downcast_ref::<rustix::io::Errno>() == Some(&rustix::io::Errno::BUSY))
        {
            crate::error::Busy(format!(
                "{} is in use: close the files and shells in it, then run `laybak umount` again",
                target.display()
            ))
            .into()
        } else {
            e
        }
    })?;
    let _ = fs::remove_file(dir(state_dir).join(format!("{}.json", rec.id)));
    Ok(())
}

fn empty_dir(state_dir: &Path) -> Result<PathBuf> {
    let p = state_dir.join("empty");
    crate::fsx::private_dir(&p)?;
    if fs::read_dir(&p)?.next().is_some() {
        bail!(
            "{} should be empty (laybak uses it as an empty layer): remove what is in it",
            p.display()
        );
    }
    Ok(p)
}

/// Materialize repository layer `id` as an overlay lowerdir in the cache
/// under `name` (reused when present).
///
/// # Errors
/// Repository or filesystem failure.
pub fn cached_layer(
    state_dir: &Path,
    repo: &Repo,
    name: &str,
    id: &LayerId,
    layer: &Layer,
) -> Result<PathBuf> {
    let cache = state_dir.join("cache");
    let dir = cache.join(name);
    if dir.exists() {
        touch(&dir);
        return Ok(dir);
    }
    crate::fsx::private_dir(&cache)?;
    let tmp = cache.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    crate::fsx::private_dir(&tmp)?;
    let items: Vec<crate::materialize::Item<'_>> = layer
        .entries
        .iter()
        .map(|e| crate::materialize::Item {
            entry: e,
            link: e.link.map(|g| (0, g)),
        })
        .collect();
    crate::materialize::write_tree(
        repo,
        &crate::materialize::Dest::own(&tmp)?,
        &items,
        crate::materialize::Target::Lowerdir,
        crate::materialize::Safety::default(),
        None,
    )
    .with_context(|| format!("materializing layer {}", id.short()))?;
    if let Err(e) = fs::rename(&tmp, &dir) {
        // Another laybak materialized the same layer meanwhile: use theirs.
        let _ = fs::remove_dir_all(&tmp);
        if !dir.exists() {
            return Err(e).with_context(|| format!("cannot create {}", dir.display()));
        }
    }
    // Its size, for the bound on the cache (walking big layers at every
    // mount would cost what the cache saves).
    let sizes = cache.join(".sizes");
    crate::fsx::private_dir(&sizes)?;
    let bytes = layer.data_bytes() + 4096 * layer.entries.len() as u64;
    let _ = fs::write(sizes.join(name), bytes.to_string());
    crate::backend::sync_dir(&cache)?;
    Ok(dir)
}

/// Mark a cache entry as just used (its mtime orders eviction).
fn touch(dir: &Path) {
    let now = rustix::fs::Timespec {
        tv_sec: crate::format::Time::now().secs,
        tv_nsec: 0,
    };
    let _ = rustix::fs::utimensat(
        rustix::fs::CWD,
        dir,
        &rustix::fs::Timestamps {
            last_access: now,
            last_modification: now,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    );
}

/// Remove least recently used cached layers that no live mount uses until
/// the cache holds at most `max` bytes (as recorded when each was built).
///
/// # Errors
/// The cache cannot be listed.
pub fn evict_to_size(state_dir: &Path, max: u64) -> Result<()> {
    let cache = state_dir.join("cache");
    let Ok(rd) = fs::read_dir(&cache) else {
        return Ok(());
    };
    let in_use: HashSet<String> = live(state_dir)?.into_iter().flat_map(|r| r.cache).collect();
    let mut entries: Vec<(i64, u64, String)> = Vec::new();
    let mut total = 0u64;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || Id::parse(name.split('.').next().unwrap_or("")).is_none() {
            continue;
        }
        let size = fs::read_to_string(cache.join(".sizes").join(&name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let mtime = e.metadata().map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.mtime()
        });
        total += size;
        entries.push((mtime.unwrap_or(0), size, name));
    }
    entries.sort();
    for (_, size, name) in entries {
        if total <= max {
            break;
        }
        if in_use.contains(&name) {
            continue;
        }
        let p = cache.join(&name);
        fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        let _ = fs::remove_file(cache.join(".sizes").join(&name));
        total -= size;
    }
    Ok(())
}

/// Remove cached layers that no snapshot of `repo` references any more and
/// no live mount uses (forgotten and pruned data must not stay readable
/// here), and leftovers of interrupted materializations. Returns how many
/// were removed.
///
/// # Errors
/// The cache cannot be listed, or the repository's snapshots not read.
pub fn evict(state_dir: &Path, repo: &Repo) -> Result<usize> {
    let cache = state_dir.join("cache");
    let rd = match fs::read_dir(&cache) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", cache.display())),
    };
    let (snaps, bad) = repo.snapshots_tolerant()?;
    if !bad.is_empty() {
        // Unreadable records might reference anything: keep everything.
        return Ok(0);
    }
    let wanted: HashSet<String> = snaps
        .iter()
        .flat_map(|(_, s)| s.layers.iter().map(LayerId::hex))
        .collect();
    let in_use: HashSet<String> = live(state_dir)?.into_iter().flat_map(|r| r.cache).collect();
    let mut n = 0;
    for ent in rd {
        let name = ent?.file_name().to_string_lossy().into_owned();
        let layer = name.split('.').next().unwrap_or("");
        let is_layer = Id::parse(layer).is_some() && !name.starts_with('.');
        let is_tmp = name.starts_with(".tmp-");
        if (is_layer && !wanted.contains(layer) && !in_use.contains(&name))
            || (is_tmp && !in_use.contains(&name))
        {
            if is_tmp {
                // A materialization of a running laybak has its pid in the name.
                let pid = name.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
                if pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
                    continue;
                }
            }
            let p = cache.join(&name);
            fs::remove_dir_all(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            let _ = fs::remove_file(cache.join(".sizes").join(&name));
            n += 1;
        }
    }
    Ok(n)
}

/// Refuse (exit 11) while live historical mounts stack local layers of
/// volume `name`.
///
/// # Errors
/// Such mounts exist.
pub fn refuse_if_used(state_dir: &Path, name: &str, what: &str) -> Result<()> {
    let used = using_volume(state_dir, name)?;
    if used.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = used
        .iter()
        .map(|r| r.target.display().to_string())
        .collect();
    Err(crate::error::Busy(format!(
        "snapshots of volume {name} are mounted from its local layers at {}: {what} would change them under their users; run `laybak umount` on them first",
        list.join(", ")
    ))
    .into())
}

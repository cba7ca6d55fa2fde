//! Volumes: their state (this file), and by concern: [`lifecycle`]
//! (attach, up, down, detach), [`rotate`](mod@rotate) (snapshot's seal and swap,
//! merges, folds), [`archive`](mod@archive) (pending layers into the repository),
//! [`lineage`] (status, local layers of repository snapshots).
//!
//! A volume's layer store lives inside the volume directory itself, in
//! `.laybak/` on the underlying filesystem, so importing the existing
//! contents is a rename even when the directory is a mount point of its own
//! filesystem. Before the overlay is mounted over the directory, a private
//! bind mount of it is made at `STATE/backing/NAME`; laybak reaches the
//! layers through that bind while the overlay hides them from users.
//!
//! ```text
//! /srv/data                       overlay mount (what users see)
//! STATE/backing/data/.laybak/l/N  layer N (sealed layers, and the upper)
//! STATE/backing/data/.laybak/work overlay workdir
//! STATE/volumes/data.json         volume state (this module's VolumeState)
//! STATE/volumes/data.lock         flock held by the running laybak
//! ```

use crate::error::{Busy, Error as Failure, Kind, need_root};
use crate::fold;
use crate::format::{LayerId, SnapshotId, Time};
use crate::overlay::{self, Spec};
use crate::repo::{Repo, Snapshot};
use crate::scan::{self, Source};
use anyhow::{Context, Result, anyhow, bail};
use rustix::fd::AsFd;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod archive;
pub mod lifecycle;
pub mod lineage;
pub mod rotate;

pub use archive::*;
pub use lifecycle::*;
pub use lineage::*;
pub use rotate::*;

/// How long a laybak waits for another to release a volume.
const LOCK_GRACE: Duration = Duration::from_secs(3);

/// Name of the layer store inside a volume directory.
pub const STORE: &str = ".laybak";

/// Default bound on the live chain (sealed layers below the upper).
pub const DEFAULT_MAX_LAYERS: usize = 8;

/// Where an attach stands (so `up` can finish an interrupted one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Moving the existing contents into the base layer.
    Attaching,
    /// Normal operation.
    Ready,
}

/// A sealed layer kept locally.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalLayer {
    /// Directory name under `.laybak/l/`.
    pub seq: u64,
    /// When it was sealed.
    pub sealed: Time,
    /// Tags for its snapshot.
    pub tags: Vec<String>,
    /// Repository layer ids this directory holds, bottom first (more than
    /// one after a fold); empty while it waits to be archived.
    pub archived: Vec<LayerId>,
    /// (layer id, snapshot id) of a snapshot record being written, so a
    /// run that crashed after writing it adopts it instead of writing a
    /// second record for the same layer.
    #[serde(default)]
    pub writing: Option<(LayerId, SnapshotId)>,
    /// Entries in the directory (from its archive; summed by merges), to
    /// pick the cheapest layers to merge.
    #[serde(default)]
    pub entries: u64,
}

/// Persistent state of one volume (`STATE/volumes/NAME.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeState {
    /// State file version.
    pub version: u32,
    /// Volume name (snapshot records carry it).
    pub name: String,
    /// The volume directory.
    pub path: PathBuf,
    /// Repository location.
    pub repo: PathBuf,
    /// The repository was encrypted when this volume last archived to it:
    /// a plaintext one in its place (a replaced config) is refused.
    #[serde(default)]
    pub repo_encrypted: bool,
    /// Bound on the live chain.
    pub max_layers: usize,
    /// Attach progress.
    pub phase: Phase,
    /// Sealed layers, bottom first.
    pub layers: Vec<LocalLayer>,
    /// The current upper directory's seq.
    pub upper: u64,
    /// Next seq to allocate.
    pub next_seq: u64,
    /// Last snapshot written for this volume.
    pub last_snapshot: Option<SnapshotId>,
    /// A fold of layer `.0` into `.1` is in progress.
    pub folding: Option<(u64, u64)>,
    /// Whether the volume should be mounted (`down` clears it).
    pub up: bool,
    /// Modification time (secs, nanos) of the volume root before attach,
    /// re-applied to the base layer after its contents are moved in.
    #[serde(default)]
    pub attach_root_mtime: Option<(i64, i64)>,
    /// Root mtime of the flattened volume, noted by `detach` before it
    /// moves the contents back (a resumed detach needs the original).
    #[serde(default)]
    pub detach_root_mtime: Option<(i64, i64)>,
    /// Name the layer store was renamed to by `detach` because the user's
    /// data holds its own `.laybak`.
    #[serde(default)]
    pub detach_store: Option<String>,
    /// Repository layers made by `forget` from layers this host still has
    /// locally: squashed id → the ids it replaced (which may themselves be
    /// squashed ids). Lets historical mounts use local layer directories.
    #[serde(default)]
    pub aliases: std::collections::BTreeMap<LayerId, Vec<LayerId>>,
    /// Retention policy applied by `snapshot --forget`.
    #[serde(default)]
    pub policy: Option<crate::reclaim::Policy>,
    /// Workdir of the live generation: `.laybak/w/N` (each generation gets
    /// a fresh one); `None` for volumes attached before 0.2 (`.laybak/work`).
    #[serde(default)]
    pub work: Option<u64>,
    /// A generation swap to upper `N` was started: `up` or the next
    /// snapshot finds out whether it happened and finishes or undoes it.
    #[serde(default)]
    pub rotating: Option<u64>,
    /// Never-reused mount id of the generation that swap replaces (noted
    /// before it starts, so a crash cannot lose track of it).
    #[serde(default)]
    pub rotating_old: Option<overlay::GenId>,
    /// Detached old generations (mount id, superblock device) that
    /// processes may still be inside (read-only). Their layers are not
    /// folded or deleted while one is in use.
    #[serde(default)]
    pub old_gens: Vec<overlay::GenId>,
    /// Rotate by unmounting (0.1's behaviour): busy volumes are refused
    /// instead of leaving their users a frozen view.
    #[serde(default)]
    pub strict_rotation: bool,
    /// Layers `.0` and `.1` are being merged into a fresh layer `.2`
    /// (by hard links); the next generation stacks `.2` instead of both.
    #[serde(default)]
    pub merging: Option<(u64, u64, u64)>,
    /// Layer directories replaced by a merge, kept while an old generation
    /// or a historical mount may still stack them.
    #[serde(default)]
    pub retired: Vec<u64>,
    /// Quiesce hooks run around the rotation of a snapshot.
    #[serde(default)]
    pub hooks: Option<crate::hooks::Hooks>,
}

/// Paths and state of a volume.
pub struct Volume {
    /// State directory.
    pub state_dir: PathBuf,
    /// Its state.
    pub st: VolumeState,
}

fn state_file(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("volumes").join(format!("{name}.json"))
}

/// All volumes registered in `state_dir`.
///
/// # Errors
/// Unreadable state files.
pub fn all(state_dir: &Path) -> Result<Vec<Volume>> {
    let dir = state_dir.join("volumes");
    let mut out = Vec::new();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    for ent in rd {
        let p = ent?.path();
        if p.extension().is_some_and(|e| e == "json") {
            let data = fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
            let st: VolumeState = serde_json::from_slice(&data)
                .with_context(|| format!("volume state {} is corrupt", p.display()))?;
            out.push(Volume {
                state_dir: state_dir.to_path_buf(),
                st,
            });
        }
    }
    out.sort_by(|a, b| a.st.name.cmp(&b.st.name));
    Ok(out)
}

fn canonical_dir(path: &Path) -> Result<PathBuf> {
    let md = fs::metadata(path).map_err(|e| {
        anyhow!(
            "{} does not exist or is unreadable ({e}): give an existing directory",
            path.display()
        )
    })?;
    if !md.is_dir() {
        bail!("{} is not a directory: give a directory", path.display());
    }
    Ok(fs::canonicalize(path)?)
}

/// Make laybak's own directories root's alone (`0700`): the state dir, its
/// `volumes`, `backing` and `cache`, and the layer store `.laybak` of every
/// volume whose backing bind is mounted. Installs made before 0.2 had them
/// world-readable; this runs at the start of every command run as root.
///
/// # Errors
/// A directory exists but cannot be tightened.
pub fn secure_state(state_dir: &Path) -> Result<()> {
    if !rustix::process::geteuid().is_root() || !state_dir.exists() {
        return Ok(());
    }
    for d in ["", "volumes", "backing", "cache"] {
        let p = state_dir.join(d);
        if p.exists() {
            crate::fsx::private_dir(&p)
                .with_context(|| format!("cannot make {} private", p.display()))?;
        }
    }
    for v in all(state_dir)? {
        if v.backing_mounted().unwrap_or(false) {
            v.secure_store()?;
        }
    }
    Ok(())
}

/// Find the volume at `path`.
///
/// # Errors
/// `path` is not a laybak volume.
pub fn find(state_dir: &Path, path: &Path) -> Result<Volume> {
    let canon = canonical_dir(path)?;
    all(state_dir)?
        .into_iter()
        .find(|v| v.st.path == canon)
        .ok_or_else(|| {
            anyhow!(
                "{} is not a laybak volume (no state in {}): attach it with `laybak attach`, or pass the right --state-dir",
                canon.display(),
                state_dir.display()
            )
        })
}

/// An exclusive per-volume lock; released by the kernel when the process
/// dies, so a crashed run never leaves it stuck.
pub struct VolumeLock {
    _f: fs::File,
}

impl Volume {
    fn lock_path(&self) -> PathBuf {
        self.state_dir
            .join("volumes")
            .join(format!("{}.lock", self.st.name))
    }

    /// Take the volume lock, waiting a moment for a short holder (such as a
    /// `forget` noting squashed layers), then re-read the state, which the
    /// previous holder may have changed.
    ///
    /// # Errors
    /// Another laybak still holds it (exit code 11).
    pub fn lock(&mut self) -> Result<VolumeLock> {
        let start = std::time::Instant::now();
        loop {
            match self.try_lock() {
                Err(e) if start.elapsed() < LOCK_GRACE && e.downcast_ref::<Busy>().is_some() => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                r => return r,
            }
        }
    }

    /// Take the volume lock if it is free, and re-read the state.
    ///
    /// # Errors
    /// Another laybak holds it (exit code 11).
    pub fn try_lock(&mut self) -> Result<VolumeLock> {
        let lock = self.flock()?;
        let p = state_file(&self.state_dir, &self.st.name);
        if let Ok(data) = fs::read(&p) {
            self.st = serde_json::from_slice(&data)
                .with_context(|| format!("volume state {} is corrupt", p.display()))?;
        }
        Ok(lock)
    }

    fn flock(&self) -> Result<VolumeLock> {
        let p = self.lock_path();
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .with_context(|| format!("cannot open {}", p.display()))?;
        if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let holder = fs::read_to_string(&p).unwrap_or_default();
            return Err(Busy(format!(
                "another laybak (pid {}) is working on volume {}; try again when it has finished",
                holder.trim(),
                self.st.name
            ))
            .into());
        }
        f.set_len(0)?;
        write!(f, "{}", std::process::id())?;
        Ok(VolumeLock { _f: f })
    }

    /// Persist the state atomically.
    ///
    /// # Errors
    /// Write failure.
    pub fn save(&self) -> Result<()> {
        let p = state_file(&self.state_dir, &self.st.name);
        let data = serde_json::to_vec_pretty(&self.st)?;
        crate::backend::atomic_write(&p, &data, 0)
            .with_context(|| format!("cannot write volume state {}", p.display()))?;
        // Temp files of runs killed mid-write (callers hold the volume lock,
        // so none of them is being written now).
        let prefix = format!(".{}.json.tmp.", self.st.name);
        if let Ok(rd) = fs::read_dir(self.state_dir.join("volumes")) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// The private bind of the volume directory.
    pub fn backing(&self) -> PathBuf {
        self.state_dir.join("backing").join(&self.st.name)
    }

    /// Directory of layer `seq`, reached through the backing bind.
    pub fn layer_dir(&self, seq: u64) -> PathBuf {
        self.backing().join(STORE).join("l").join(seq.to_string())
    }

    fn work_dir(&self) -> PathBuf {
        match self.st.work {
            Some(n) => self.gen_work_dir(n),
            None => self.backing().join(STORE).join("work"),
        }
    }

    fn gen_work_dir(&self, n: u64) -> PathBuf {
        self.backing().join(STORE).join("w").join(n.to_string())
    }

    /// The mount spec of the live volume.
    pub fn spec(&self) -> Spec {
        Spec {
            lowers: self
                .st
                .layers
                .iter()
                .rev()
                .map(|l| self.layer_dir(l.seq))
                .collect(),
            upper: Some((self.layer_dir(self.st.upper), self.work_dir())),
            source: format!("laybak:{}", self.st.name),
        }
    }

    /// Make the layer store `.laybak` root's alone, through descriptors
    /// (the volume directory is one users may write while it is down).
    ///
    /// # Errors
    /// The store cannot be opened or changed.
    pub fn secure_store(&self) -> Result<()> {
        let root = crate::fsx::open_dir_path(&self.backing())
            .with_context(|| format!("cannot open {}", self.backing().display()))?;
        secure_store_in(&root).with_context(|| {
            format!(
                "cannot make the layer store of volume {} private",
                self.st.name
            )
        })
    }

    fn backing_mounted(&self) -> Result<bool> {
        Ok(overlay::find_mount(&self.backing())?.is_some())
    }

    /// Whether the overlay is mounted at the volume path.
    ///
    /// # Errors
    /// mountinfo unreadable.
    pub fn is_mounted(&self) -> Result<bool> {
        Ok(overlay::find_mount(&self.st.path)?.is_some_and(|m| m.fstype == "overlay"))
    }

    fn ensure_backing(&self) -> Result<()> {
        if self.backing_mounted()? {
            return Ok(());
        }
        if self.is_mounted()? {
            bail!(
                "volume {} is mounted but its backing bind {} is gone: run `laybak down {}` then `laybak up {}`",
                self.st.name,
                self.backing().display(),
                self.st.path.display(),
                self.st.path.display()
            );
        }
        crate::fsx::private_dir(&self.backing())?;
        overlay::bind_private(&self.st.path, &self.backing())?;
        self.secure_store()
    }

    fn require_mounted(&self) -> Result<()> {
        if !self.is_mounted()? {
            bail!(
                "volume {} is not mounted: bring it up with `laybak up {}`",
                self.st.name,
                self.st.path.display()
            );
        }
        if !self.backing_mounted()? {
            bail!(
                "volume {} lost its backing bind {}: run `laybak down` and `laybak up`",
                self.st.name,
                self.backing().display()
            );
        }
        Ok(())
    }
}

/// `.laybak` in the open volume directory `root`: owned by root, `0700`.
fn secure_store_in(root: &rustix::fd::OwnedFd) -> Result<()> {
    let store = crate::fsx::open_subdir(root, STORE.as_bytes())?;
    let st = rustix::fs::fstat(&store)?;
    if st.st_uid != 0 || st.st_gid != 0 {
        rustix::fs::fchown(
            &store,
            Some(rustix::fs::Uid::ROOT),
            Some(rustix::fs::Gid::ROOT),
        )?;
    }
    if st.st_mode & 0o7777 != 0o700 {
        rustix::fs::fchmod(&store, rustix::fs::Mode::from_raw_mode(0o700))?;
    }
    Ok(())
}

/// Make a fresh empty layer directory carrying `like`'s root metadata. An
/// existing empty directory (left by a crash) is reused.
fn new_layer_dir(dir: &Path, like: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if fs::read_dir(dir)?.next().is_some() {
                bail!(
                    "{} already exists and is not empty; the volume state is inconsistent: inspect it by hand",
                    dir.display()
                );
            }
        }
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    // Not synced: if a power cut loses the new upper, `up` recreates it
    // (whatever users wrote into it was not durable either).
    fold::copy_dir_meta(like, dir)
}

/// Make the volume's underlying directory immutable while it is attached,
/// so that nothing can be created in it during the milliseconds a snapshot
/// has the volume unmounted (or while it is down): such a write would land
/// under the overlay and vanish from view. Writers see an error instead.
/// Filesystems without inode flags are left as they are.
fn guard(dir: &Path, on: bool) -> Result<()> {
    use rustix::fs::IFlags;
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", dir.display()))?;
    let unsupported = |e: rustix::io::Errno| {
        matches!(
            e,
            rustix::io::Errno::NOTTY | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL
        )
    };
    let flags = match rustix::fs::ioctl_getflags(&fd) {
        Ok(f) => f,
        Err(e) if unsupported(e) => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read flags of {}", dir.display())),
    };
    let new = if on {
        flags | IFlags::IMMUTABLE
    } else {
        flags - IFlags::IMMUTABLE
    };
    if new != flags {
        match rustix::fs::ioctl_setflags(&fd, new) {
            Ok(()) => {}
            Err(e) if unsupported(e) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot set flags of {}", dir.display()));
            }
        }
    }
    Ok(())
}

fn set_mtime(p: &Path, secs: i64, nanos: i64) -> Result<()> {
    let t = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: nanos as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("cannot set times of {}", p.display()))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Hold `STATE/attach.lock` (waiting a moment for another attach).
fn state_lock(state_dir: &Path) -> Result<fs::File> {
    let p = state_dir.join("attach.lock");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .with_context(|| format!("cannot open {}", p.display()))?;
    let start = std::time::Instant::now();
    while rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        if start.elapsed() > LOCK_GRACE {
            return Err(Busy(
                "another laybak is attaching a volume in this state dir; try again when it has finished".into(),
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(f)
}

/// The error for a command that needs a volume that is down.
pub fn not_up_error(vol: &Volume) -> anyhow::Error {
    Failure::new(
        Kind::Failed,
        format!(
            "volume {} is down: run `laybak up {}`",
            vol.st.name,
            vol.st.path.display()
        ),
    )
    .into()
}

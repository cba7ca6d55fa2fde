//! Volumes: attach, rotate (snapshot), archive, up/down, detach, status.
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

/// Options for `attach`.
pub struct AttachOpts {
    /// Volume name (default: the directory's name).
    pub name: Option<String>,
    /// Bound on the live chain.
    pub max_layers: usize,
    /// Tags for the first snapshot.
    pub tags: Vec<String>,
}

/// Check that the volume's filesystem can carry an overlay: `trusted.*`
/// xattrs and `d_type`. Works in the store of the open volume directory
/// `vol` by descriptors (the directory is one users may write).
fn probe_fs(vol: &rustix::fd::OwnedFd) -> Result<()> {
    let store = crate::fsx::open_subdir(vol, STORE.as_bytes())?;
    rustix::fs::mkdirat(&store, "probe", rustix::fs::Mode::from_raw_mode(0o700))?;
    let probe = crate::fsx::open_subdir(&store, b"probe")?;
    let r = rustix::fs::fsetxattr(
        &probe,
        "trusted.laybak.probe",
        b"1",
        rustix::fs::XattrFlags::empty(),
    );
    drop(probe);
    let mut dtype_ok = false;
    for e in rustix::fs::Dir::read_from(&store)?.flatten() {
        if e.file_name().to_bytes() == b"probe" {
            dtype_ok = e.file_type() == rustix::fs::FileType::Directory;
        }
    }
    rustix::fs::unlinkat(&store, "probe", rustix::fs::AtFlags::REMOVEDIR)?;
    if r.is_err() {
        bail!(
            "the filesystem does not support trusted.* extended attributes, which overlayfs needs: use ext4, xfs or btrfs"
        );
    }
    if !dtype_ok {
        bail!(
            "the filesystem does not report file types in directory entries (d_type), which overlayfs needs"
        );
    }
    Ok(())
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

fn canonical_or(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Places attach refuses, before anything is moved: inside (or around)
/// another volume, inside any overlay, over mount points, or where the state
/// dir or the repository would end up inside the volume (or the volume
/// inside them).
fn refuse_attach_place(path: &Path, state_dir: &Path, repo: &Repo, vols: &[Volume]) -> Result<()> {
    let shown = path.display();
    for v in vols {
        if v.st.path != path && path.starts_with(&v.st.path) {
            bail!(
                "{shown} is inside laybak volume {} ({}): attach the volume itself or a directory outside it",
                v.st.name,
                v.st.path.display()
            );
        }
        if v.st.path != path && v.st.path.starts_with(path) {
            bail!(
                "{shown} contains laybak volume {} ({}): detach it first or attach a directory beside it",
                v.st.name,
                v.st.path.display()
            );
        }
    }
    for (what, p) in [
        ("laybak's state dir", canonical_or(state_dir)),
        ("the repository", canonical_or(&repo.location)),
    ] {
        if p.starts_with(path) {
            bail!(
                "{shown} contains {what} {}: keep it outside the volume (a repository inside a volume archives itself)",
                p.display()
            );
        }
        if path.starts_with(&p) {
            bail!(
                "{shown} is inside {what} {}: attach a directory outside it",
                p.display()
            );
        }
    }
    // laybak finds the volume by its path: a user who could rename a
    // directory above it could make laybak take another mount (or none)
    // for the volume. (The volume directory itself is immutable while
    // attached.)
    let mut child: Option<&Path> = Some(path);
    for anc in path.ancestors().skip(1) {
        let md = fs::symlink_metadata(anc)?;
        let sticky = md.mode() & 0o1000 != 0;
        let child_is_roots =
            child.is_none_or(|c| fs::symlink_metadata(c).is_ok_and(|m| m.uid() == 0));
        let others_write = md.mode() & 0o022 != 0 && !(sticky && child_is_roots);
        if md.uid() != 0 || others_write {
            bail!(
                "{} can be renamed by a user other than root ({} is owned by uid {} with mode {:o}): attach a directory whose parents are root's",
                shown,
                anc.display(),
                md.uid(),
                md.mode() & 0o7777
            );
        }
        child = Some(anc);
    }
    let text = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mounts = overlay::parse_mountinfo(&text);
    // The mount the directory lives on (the longest mount point above it).
    if let Some(m) = mounts
        .iter()
        .filter(|m| path.starts_with(&m.target))
        .max_by_key(|m| m.target.as_os_str().len())
        && m.fstype == "overlay"
    {
        bail!(
            "{shown} is inside an overlay mount ({}, {}): laybak will not stack on an overlay; attach the underlying directory",
            m.target.display(),
            m.source
        );
    }
    if let Some(m) = mounts
        .iter()
        .find(|m| m.target != path && m.target.starts_with(path))
    {
        bail!(
            "{shown} contains the mount point {}: unmount it or attach a directory without mounts below it (laybak moves the contents by rename, which cannot cross mounts)",
            m.target.display()
        );
    }
    Ok(())
}

/// Attach `path`: its contents become the base layer (by rename) and the
/// directory becomes an overlay volume. Returns the volume; the caller then
/// archives the base layer as the first snapshot.
///
/// # Errors
/// Not root, not a directory, already a volume, unsupported filesystem,
/// overlay artefacts in the data, or a mount failure (after which the
/// directory is restored).
pub fn attach(state_dir: &Path, repo: &Repo, path: &Path, opts: AttachOpts) -> Result<Volume> {
    need_root("attach")?;
    let path = canonical_dir(path)?;
    let name = match opts.name {
        Some(n) => n,
        None => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".into()),
    };
    if !valid_name(&name) {
        bail!(
            "{name:?} is not a usable volume name: pass --name with letters, digits, '-', '_' or '.'"
        );
    }
    // One attach at a time per state dir: the name and path checks below
    // and the state file they lead to are one step.
    crate::fsx::private_dir(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let _attach_lock = state_lock(state_dir)?;
    let existing = all(state_dir)?;
    if let Some(v) = existing.iter().find(|v| v.st.path == path) {
        bail!(
            "{} is already attached as laybak volume {}",
            path.display(),
            v.st.name
        );
    }
    if existing.iter().any(|v| v.st.name == name) {
        bail!("a volume named {name} already exists: pass --name to choose another name");
    }
    if overlay::find_mount(&path)?.is_some_and(|m| m.fstype == "overlay") {
        bail!(
            "{} is already an overlay mount: laybak will not stack on it",
            path.display()
        );
    }
    refuse_attach_place(&path, state_dir, repo, &existing)?;
    if path.join(STORE).exists() {
        bail!(
            "{} already contains {STORE}: an earlier attach was interrupted or the data belongs to another laybak; remove it or run `laybak up`",
            path.display()
        );
    }
    // Refuse overlay artefacts in user data before touching anything.
    scan::walk(&path, Source::Base)?;
    let root_md = fs::symlink_metadata(&path)?;
    let store = path.join(STORE);
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&store)
            .with_context(|| format!("cannot create {}", store.display()))?;
    }
    let vfd = crate::fsx::open_dir_path(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if let Err(e) = probe_fs(&vfd) {
        // Remove only what the probe made (empty directories): never a
        // tree a user may have put under that name meanwhile.
        if let Ok(st) = crate::fsx::open_subdir(&vfd, STORE.as_bytes()) {
            let _ = rustix::fs::unlinkat(&st, "probe", rustix::fs::AtFlags::REMOVEDIR);
        }
        let _ = rustix::fs::unlinkat(&vfd, STORE, rustix::fs::AtFlags::REMOVEDIR);
        return Err(e);
    }
    let st = VolumeState {
        version: 1,
        name,
        path: path.clone(),
        repo: repo.location.clone(),
        max_layers: opts.max_layers.clamp(2, 400),
        phase: Phase::Attaching,
        layers: vec![LocalLayer {
            seq: 1,
            sealed: Time::now(),
            tags: opts.tags,
            archived: Vec::new(),
            writing: None,
            entries: 0,
        }],
        upper: 2,
        next_seq: 3,
        last_snapshot: None,
        folding: None,
        up: true,
        attach_root_mtime: Some((root_md.mtime(), root_md.mtime_nsec())),
        policy: None,
        detach_root_mtime: None,
        detach_store: None,
        work: None,
        rotating: None,
        rotating_old: None,
        old_gens: Vec::new(),
        strict_rotation: false,
        merging: None,
        retired: Vec::new(),
        hooks: None,
        aliases: Default::default(),
    };
    fs::create_dir_all(state_dir.join("volumes"))
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let mut vol = Volume {
        state_dir: state_dir.to_path_buf(),
        st,
    };
    let _lock = vol.flock()?;
    crate::backend::private_dirs(&store.join("l"))?;
    crate::backend::private_dirs(&store.join("work"))?;
    vol.save()?;
    finish_attach(&mut vol)?;
    Ok(vol)
}

/// Move the volume's contents into the base layer (resumable), then mount.
fn finish_attach(vol: &mut Volume) -> Result<()> {
    let path = vol.st.path.clone();
    let store = path.join(STORE);
    let base = store.join("l").join("1");
    {
        // Users may write the directory while it is attached: move by
        // descriptors, one name at a time, never through a path they own.
        let vfd = crate::fsx::open_dir_path(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        secure_store_in(&vfd)?;
        let store_fd = crate::fsx::open_subdir(&vfd, STORE.as_bytes())?;
        let l_fd = crate::fsx::open_subdir(&store_fd, b"l")?;
        match rustix::fs::mkdirat(&l_fd, "1", rustix::fs::Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e).context("cannot create the base layer"),
        }
        let base_fd = crate::fsx::open_subdir(&l_fd, b"1")?;
        for name in crate::fsx::names(&vfd)? {
            if name == STORE.as_bytes() {
                continue;
            }
            crate::fsx::rename_at(&vfd, &name, &base_fd, &name).with_context(|| {
                format!(
                    "cannot move {} into the base layer",
                    crate::layer::show(&name)
                )
            })?;
        }
    }
    fold::copy_dir_meta(&path, &base)?;
    if let Some((secs, nanos)) = vol.st.attach_root_mtime {
        set_mtime(&base, secs, nanos)?;
    }
    let upper = store.join("l").join(vol.st.upper.to_string());
    new_layer_dir(&upper, &base)?;
    crate::backend::sync_dir(&store.join("l"))?;
    crate::backend::sync_dir(&path)?;
    crate::failpoint::hit("attach-moved")?;
    vol.ensure_backing()?;
    guard(&vol.backing(), true)?;
    overlay::mount(&vol.spec(), &path)?;
    vol.st.phase = Phase::Ready;
    vol.st.up = true;
    vol.save()
}

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
fn below_layers(vol: &Volume, repo: &Repo, i: usize) -> Result<Vec<LayerId>> {
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

/// Whether this volume rotates by swapping generations (not strict, and a
/// kernel with the new mount API: `LAYBAK_FORCE_MOUNT2` stands for an old
/// one).
fn gap_free(vol: &Volume) -> bool {
    !vol.st.strict_rotation && std::env::var_os("LAYBAK_FORCE_MOUNT2").is_none()
}

/// Finish or undo a generation swap that a crash interrupted, looking at
/// the real mount stack on the volume: the new generation on top (swap
/// done), beneath the frozen old one (detach it, then done), or nowhere
/// (thaw the old one, remove the new upper and workdir).
fn recover_rotation(vol: &mut Volume) -> Result<()> {
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
fn apply_merge(st: &mut VolumeState, a: u64, b: u64, f: u64) {
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

fn discard_merge(vol: &mut Volume) {
    if let Some((_, _, f)) = vol.st.merging.take() {
        let _ = fs::remove_dir_all(vol.layer_dir(f));
    }
}

/// Move layer directories a merge replaced out of `l/` (a mount that
/// stacks them keeps them by reference, renaming does not disturb it).
fn retire(vol: &mut Volume, seqs: &[u64]) -> Result<()> {
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
fn sweep_retired(vol: &mut Volume) -> Result<()> {
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
fn merge_pick(vol: &Volume) -> Option<(u64, u64)> {
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

/// Work a snapshot does before it rotates, outside the quiesce hooks'
/// window (so a stopped service is not kept down by it): finish an
/// interrupted swap, and build the merge the coming rotation will stack
/// when the chain is too long.
///
/// # Errors
/// State or mount errors.
pub fn prepare_rotation(vol: &mut Volume) -> Result<()> {
    recover_rotation(vol)?;
    if gap_free(vol) && vol.is_mounted()? {
        prepare_merge(vol)?;
    }
    Ok(())
}

/// Build the merge for the coming rotation when the chain is too long.
/// A failure here only means no merge this time.
fn prepare_merge(vol: &mut Volume) -> Result<()> {
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
fn advance(st: &mut VolumeState, old: u64, seq: u64, tags: Vec<String>) -> Option<[u64; 2]> {
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

fn discard_new_gen(vol: &Volume, seq: u64) {
    let _ = fs::remove_dir(vol.layer_dir(seq));
    let _ = fs::remove_dir_all(vol.gen_work_dir(seq));
}

/// The gap-free rotation. `Ok(None)`: done. `Ok(Some(why))`: this kernel
/// cannot do it, nothing changed, rotate the old way.
fn rotate_beneath(
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
fn remove_stale_workdirs(vol: &Volume, prev: Option<u64>) {
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
fn rotate_remount(vol: &mut Volume, wait: Duration, tags: Vec<String>) -> Result<()> {
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
fn prune_old_gens(vol: &mut Volume) {
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
fn refuse_if_old_gens_used(vol: &mut Volume, what: &str) -> Result<()> {
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
fn fold_wanted(vol: &Volume) -> bool {
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
fn fold_allowed(vol: &mut Volume) -> Result<bool> {
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
fn fold_if_needed(vol: &mut Volume) -> Result<()> {
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
        vol.st.folding = Some((up, low));
        vol.save()?;
        finish_fold(vol, up, low)?;
    }
    Ok(())
}

fn finish_fold(vol: &mut Volume, up: u64, low: u64) -> Result<()> {
    let keep_markers = false; // the target is the bottom layer
    crate::failpoint::hit("fold")?;
    let (u, l) = (vol.layer_dir(up), vol.layer_dir(low));
    if u.exists() {
        fold::fold(&u, &l, keep_markers)?;
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

/// Bring a volume up: finish an interrupted attach or fold, make the
/// backing bind and mount the overlay. Idempotent.
///
/// # Errors
/// Mount failures.
pub fn up(vol: &mut Volume) -> Result<bool> {
    need_root("up")?;
    let _lock = vol.lock()?;
    recover_rotation(vol)?;
    if vol.st.phase == Phase::Attaching {
        finish_attach(vol)?;
        return Ok(true);
    }
    if vol.is_mounted()? {
        vol.ensure_backing()?;
        guard(&vol.backing(), true)?;
        return Ok(false);
    }
    vol.ensure_backing()?;
    guard(&vol.backing(), true)?;
    if let Some((u, l)) = vol.st.folding {
        finish_fold(vol, u, l)?;
    }
    let upper = vol.layer_dir(vol.st.upper);
    if !upper.exists() {
        let like = vol
            .st
            .layers
            .last()
            .map(|l| vol.layer_dir(l.seq))
            .ok_or_else(|| anyhow!("volume state has no layers"))?;
        new_layer_dir(&upper, &like)?;
    }
    overlay::mount(&vol.spec(), &vol.st.path)?;
    vol.st.up = true;
    vol.save()?;
    Ok(true)
}

/// Unmount a volume cleanly (never lazily) and its backing bind.
///
/// # Errors
/// Busy after `wait`.
pub fn down(vol: &mut Volume, wait: Duration) -> Result<()> {
    need_root("down")?;
    let _lock = vol.lock()?;
    recover_rotation(vol)?;
    if vol.is_mounted()? {
        overlay::unmount_wait(&vol.st.path, wait)?;
    }
    if vol.backing_mounted()? {
        refuse_if_old_gens_used(vol, "down")?;
        overlay::unmount_wait(&vol.backing(), wait)?;
    }
    vol.st.up = false;
    vol.save()
}

/// Stop managing a volume: flatten every layer into a plain directory with
/// the current contents (renames only) and forget the volume locally. The
/// repository is not touched. Returns how many layers were never archived.
///
/// # Errors
/// Busy, or filesystem errors (rerun `detach` to resume).
pub fn detach(vol: &mut Volume, wait: Duration) -> Result<usize> {
    need_root("detach")?;
    let lock = vol.lock()?;
    crate::mounts::refuse_if_used(&vol.state_dir, &vol.st.name, "detach")?;
    recover_rotation(vol)?;
    refuse_if_old_gens_used(vol, "detach")?;
    let pending = vol
        .st
        .layers
        .iter()
        .filter(|l| l.archived.is_empty())
        .count();
    if vol.is_mounted()? {
        overlay::unmount_wait(&vol.st.path, wait)?;
    }
    vol.ensure_backing()?;
    if let Some((u, l)) = vol.st.folding {
        finish_fold(vol, u, l)?;
    }
    let base_seq = vol
        .st
        .layers
        .first()
        .map(|l| l.seq)
        .ok_or_else(|| anyhow!("no layers"))?;
    if vol.st.detach_store.is_none() {
        let base = vol.layer_dir(base_seq);
        let mut rest: Vec<u64> = vol.st.layers.iter().skip(1).map(|l| l.seq).collect();
        rest.push(vol.st.upper);
        for seq in rest {
            let d = vol.layer_dir(seq);
            if d.exists() {
                fold::fold(&d, &base, false)?;
                fs::remove_dir(&d)?;
                crate::failpoint::hit("detach-fold")?;
            }
        }
        fold::strip_overlay_artifacts(&base)?;
    }
    let root = vol.backing();
    guard(&root, false)?;
    let rfd = crate::fsx::open_dir_path(&root)
        .with_context(|| format!("cannot open {}", root.display()))?;
    let store = detach_store_name(vol, &rfd, base_seq)?;
    let base_rel = format!("{store}/l/{base_seq}");
    let base_fd = crate::fsx::open_beneath(&rfd, base_rel.as_bytes(), open_dir_flags())
        .with_context(|| {
            format!(
                "cannot open the flattened layer {base_rel} of {}",
                root.display()
            )
        })?;
    if vol.st.detach_root_mtime.is_none() {
        let st = rustix::fs::fstat(&base_fd)?;
        vol.st.detach_root_mtime = Some((st.st_mtime, st.st_mtime_nsec as i64));
        vol.save()?;
    }
    let (mt, mt_ns) = vol.st.detach_root_mtime.unwrap_or_default();
    for name in crate::fsx::names(&base_fd)? {
        crate::fsx::rename_at(&base_fd, &name, &rfd, &name).with_context(|| {
            format!(
                "cannot move {} back into {}",
                crate::layer::show(&name),
                vol.st.path.display()
            )
        })?;
        crate::failpoint::hit("detach-move")?;
    }
    crate::fsx::copy_meta_fd(base_fd.as_fd(), rfd.as_fd(), fold::is_user_xattr)?;
    drop(base_fd);
    crate::fsx::remove_all_at(&rfd, store.as_bytes()).with_context(|| {
        format!(
            "cannot remove the layer store {store} of {}",
            root.display()
        )
    })?;
    // Moving entries and removing the store changed the root's mtime.
    crate::fsx::set_times_fd(&rfd, (mt, mt_ns), (mt, mt_ns))?;
    rustix::fs::fsync(&rfd)?;
    drop(rfd);
    overlay::unmount_wait(&root, wait)?;
    let _ = fs::remove_dir(&root);
    fs::remove_file(state_file(&vol.state_dir, &vol.st.name))?;
    drop(lock);
    let _ = fs::remove_file(vol.lock_path());
    Ok(pending)
}

fn open_dir_flags() -> rustix::fs::OFlags {
    rustix::fs::OFlags::DIRECTORY
        | rustix::fs::OFlags::RDONLY
        | rustix::fs::OFlags::CLOEXEC
        | rustix::fs::OFlags::NOFOLLOW
}

/// The name of the layer store while `detach` moves the data back. Users
/// can create their own `.laybak` in the volume (it lives in a layer like
/// any file); then the store is first renamed out of its way, under a name
/// recorded in the state so a resumed detach finds it.
fn detach_store_name(vol: &mut Volume, rfd: &rustix::fd::OwnedFd, base_seq: u64) -> Result<String> {
    if let Some(n) = vol.st.detach_store.clone() {
        if crate::fsx::stat_at(rfd, n.as_bytes())?.is_none() {
            // Recorded but not yet renamed (crash in between): nothing moved yet.
            crate::fsx::rename_at(rfd, STORE.as_bytes(), rfd, n.as_bytes())?;
        }
        return Ok(n);
    }
    let base_rel = format!("{STORE}/l/{base_seq}");
    let base_fd = crate::fsx::open_beneath(rfd, base_rel.as_bytes(), open_dir_flags())?;
    let taken = crate::fsx::names(&base_fd)?;
    if !taken.iter().any(|n| n == STORE.as_bytes()) {
        return Ok(STORE.to_string());
    }
    let name = (0..)
        .map(|k| format!("{STORE}.detaching.{k}"))
        .find(|n| !taken.iter().any(|t| t == n.as_bytes()))
        .expect("an unused name exists");
    vol.st.detach_store = Some(name.clone());
    vol.save()?;
    crate::fsx::rename_at(rfd, STORE.as_bytes(), rfd, name.as_bytes())?;
    crate::backend::sync_dir(&vol.backing())?;
    Ok(name)
}

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
fn lookup_in(dir: rustix::fd::OwnedFd, comps: &[&[u8]]) -> Option<rustix::fs::Stat> {
    let (last, parents) = comps.split_last()?;
    let mut d = dir;
    for c in parents {
        d = crate::fsx::open_subdir(&d, c).ok()?;
    }
    crate::fsx::stat_at(&d, last).ok().flatten()
}

fn exists_below(vol: &Volume, path: &[u8]) -> bool {
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
            crate::layer::Node::Dir { opaque: true } if below => "replaced",
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

fn expand(
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

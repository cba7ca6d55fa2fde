//! Overlay mounts: option building (pure) and the mount syscalls.
//!
//! Volumes are mounted with the new mount API (fsopen / fsconfig
//! `lowerdir+` / fsmount / move_mount, kernel ≥ 6.8), falling back to
//! classic mount(2) with a length-checked option string on older kernels.
//! Every option is passed explicitly, and the effective options are checked
//! in mountinfo after mounting. Unmounting is never lazy.

use anyhow::{Context, Result, anyhow, bail};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, Mode, OFlags, StatxFlags};
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MountPropagationFlags, MoveMountFlags,
    OpenTreeFlags, UnmountFlags,
};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The fixed options of every laybak overlay mount: directory renames in
/// place (`redirect_dir=on`: made and followed; RESEARCH.md A.2 — it needs
/// neither index nor metacopy), no metacopy, no index (rotation shares
/// layers between generations: RESEARCH.md B.5). `on` is passed even for
/// read-only views, which then follow redirects: a kernel built with
/// `REDIRECT_ALWAYS_FOLLOW=n` would otherwise refuse them (EPERM).
pub const FIXED_OPTIONS: &[(&str, &str)] = &[
    ("redirect_dir", "on"),
    ("index", "off"),
    ("metacopy", "off"),
    ("nfs_export", "off"),
    ("xino", "off"),
];

/// Options that must not show up in mountinfo after a laybak mount.
pub const FORBIDDEN_EFFECTIVE: &[&str] = &[
    "redirect_dir=nofollow",
    "redirect_dir=off",
    "index=on",
    "metacopy=on",
    "nfs_export=on",
    "xino=on",
    "volatile",
    "fsync=volatile",
    "userxattr",
];

/// What to mount.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Lower layers, top first.
    pub lowers: Vec<PathBuf>,
    /// Upper and work dirs; `None` for a read-only view.
    pub upper: Option<(PathBuf, PathBuf)>,
    /// Shown as the mount source in mountinfo.
    pub source: String,
}

/// Build the classic mount(2) option string. Fails when it would exceed a
/// page (the kernel would silently truncate it) or a path contains a
/// character the legacy syntax cannot carry.
///
/// # Errors
/// Too long, or unrepresentable paths.
pub fn legacy_options(spec: &Spec, uuid: Option<&str>) -> Result<String> {
    let esc = |p: &Path| -> Result<String> {
        let s = p
            .to_str()
            .ok_or_else(|| anyhow!("layer path {} is not UTF-8", p.display()))?;
        if s.contains(',') || s.contains('\n') {
            bail!("layer path {s:?} contains a comma; the legacy mount syntax cannot carry it");
        }
        Ok(s.replace(':', "\\:"))
    };
    let lowers: Vec<String> = spec.lowers.iter().map(|p| esc(p)).collect::<Result<_>>()?;
    let mut opts = vec![format!("lowerdir={}", lowers.join(":"))];
    if let Some((u, w)) = &spec.upper {
        opts.push(format!("upperdir={}", esc(u)?));
        opts.push(format!("workdir={}", esc(w)?));
    }
    for (k, v) in FIXED_OPTIONS {
        opts.push(format!("{k}={v}"));
    }
    if let Some(u) = uuid {
        opts.push(format!("uuid={u}"));
    }
    let s = opts.join(",");
    if s.len() >= 4096 - 1 {
        bail!(
            "the mount option string would be {} bytes, over the one-page limit of mount(2): squash the volume's layers or use a kernel ≥ 6.8",
            s.len()
        );
    }
    Ok(s)
}

fn read_fs_log(fs: &rustix::fd::OwnedFd) -> String {
    let mut msgs = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = rustix::io::read(fs, &mut buf) {
        if n == 0 {
            break;
        }
        msgs.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    msgs.join("; ")
}

fn mount_new_api(spec: &Spec, target: &Target, flags: MountAttrFlags) -> Result<u64> {
    attach(&build(spec, flags)?, target)
}

/// Create the overlay of `spec` as a detached mount (nothing is visible
/// anywhere until it is attached).
fn build(spec: &Spec, flags: MountAttrFlags) -> Result<OwnedFd> {
    let fs =
        rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).context("fsopen(overlay)")?;
    let set = |k: &str, v: &std::ffi::OsStr| {
        rustix::mount::fsconfig_set_string(&fs, k, v).map_err(|e| {
            anyhow!(
                "overlay option {k}={}: {e} ({})",
                v.to_string_lossy(),
                read_fs_log(&fs)
            )
        })
    };
    set("source", std::ffi::OsStr::new(&spec.source))?;
    for l in &spec.lowers {
        if l.as_os_str().len() > 255 {
            bail!("layer path {} is longer than 255 bytes", l.display());
        }
        set("lowerdir+", l.as_os_str())?;
    }
    if let Some((u, w)) = &spec.upper {
        set("upperdir", u.as_os_str())?;
        set("workdir", w.as_os_str())?;
    }
    for (k, v) in FIXED_OPTIONS {
        set(k, std::ffi::OsStr::new(v))?;
    }
    // uuid=null (≥ 6.6) keeps overlay from writing trusted.overlay.uuid.
    if rustix::mount::fsconfig_set_string(&fs, "uuid", "null").is_err() {
        let _ = read_fs_log(&fs);
        let _ = rustix::mount::fsconfig_set_string(&fs, "uuid", "off");
        let _ = read_fs_log(&fs);
    }
    rustix::mount::fsconfig_create(&fs)
        .map_err(|e| anyhow!("creating the overlay failed: {e} ({})", read_fs_log(&fs)))?;
    // Built detached, with its final flags, then attached onto the target
    // descriptor: there is no moment at which it is mounted differently or
    // somewhere else.
    rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, flags)
        .map_err(|e| anyhow!("fsmount: {e}"))
}

/// Why a generation swap did not happen. Nothing changed in any of them.
#[derive(Debug)]
pub enum SwapError {
    /// The kernel cannot mount beneath (before 6.5) or lacks the new mount
    /// API: use the unmount/mount rotation.
    Unsupported(anyhow::Error),
    /// Files are open for writing in the volume (freezing it returned EBUSY
    /// until `wait` ran out).
    Writers,
    /// The new generation is mounted beneath the frozen old one, which
    /// could not be detached: the volume stays read-only until `laybak up`
    /// (or the next snapshot) finishes the swap.
    Stuck(anyhow::Error),
    /// Anything else.
    Failed(anyhow::Error),
}

/// Lazily detach the top mount at `target` (a frozen old generation).
///
/// # Errors
/// The kernel refused.
pub fn detach_top(target: &Target) -> Result<()> {
    rustix::mount::unmount(
        target.proc_path().as_path(),
        UnmountFlags::DETACH | UnmountFlags::NOFOLLOW,
    )
    .context("cannot detach the old generation")
}

/// Make the top mount at `target` writable again, at the mount and at the
/// superblock (after a crash between freezing and swapping). Harmless when
/// it is writable.
pub fn thaw(target: &Target) {
    if let Ok(top) = target.fresh() {
        let _ = freeze(&top, false);
    }
    let _ = rustix::mount::mount_remount(target.proc_path().as_path(), MountFlags::BIND, "");
}

/// Whether mountinfo options `opts` name `dir` as the upper directory.
pub fn has_upper(opts: &str, dir: &Path) -> bool {
    opts.split(',')
        .filter_map(|o| o.strip_prefix("upperdir="))
        .any(|u| unescape(u) == dir.as_os_str().as_bytes())
}

/// The old generation after a swap: frozen read-only and detached, held
/// open by this descriptor so the teardown of its dentries (tens of ms on a
/// hot tree) happens when the holder drops it, not inside the swap.
pub struct OldGeneration {
    /// Its identity (processes still inside it keep it alive).
    pub id: GenId,
    hold: OwnedFd,
}

impl OldGeneration {
    /// Drop the last reference on a background thread.
    pub fn release_in_background(self) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || drop(self.hold))
    }
}

/// How a generation is frozen: the mount only (no sync, a ~0.1 ms window),
/// or the whole superblock (covers bind mounts and copies of the mount in
/// other mount namespaces, but syncs the upper filesystem inside the
/// window).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Freeze {
    Mount,
    Superblock,
}

/// Whether unprivileged users can make mount namespaces of their own
/// (`unshare -Urm`): a copy of the volume's mount in one can be pinned with
/// no process inside it, where no scan of `/proc` sees it.
fn users_can_copy_mounts() -> bool {
    let zero = |p: &str| std::fs::read_to_string(p).is_ok_and(|s| s.trim() == "0");
    !(zero("/proc/sys/user/max_user_namespaces")
        || zero("/proc/sys/kernel/unprivileged_userns_clone"))
}

/// Whether the overlay mounted at `dev` ("major:minor" in mountinfo) is
/// also mounted somewhere else: a bind mount here, or a copy in another
/// mount namespace (services with private mounts have those).
fn mounted_elsewhere(dev: &str, live: u64) -> bool {
    let mine = std::fs::read_link("/proc/self/ns/mnt").ok();
    let count = |text: &str, skip: Option<u64>| {
        text.lines()
            .filter(|l| {
                let f: Vec<&str> = l.split(' ').take(3).collect();
                f.len() == 3 && f[2] == dev && Some(f[0].parse().unwrap_or(0)) != skip
            })
            .count()
    };
    if let Ok(t) = std::fs::read_to_string("/proc/self/mountinfo")
        && count(&t, Some(live)) > 0
    {
        return true;
    }
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return true;
    };
    let mut seen = std::collections::HashSet::new();
    for e in rd.flatten() {
        if e.file_name()
            .to_str()
            .is_none_or(|n| n.parse::<u32>().is_err())
        {
            continue;
        }
        let Ok(ns) = std::fs::read_link(e.path().join("ns/mnt")) else {
            continue;
        };
        if Some(&ns) == mine.as_ref() || !seen.insert(ns) {
            continue;
        }
        if std::fs::read_to_string(e.path().join("mountinfo")).is_ok_and(|t| count(&t, None) > 0) {
            return true;
        }
    }
    false
}

fn freeze_with(how: Freeze, target: &Target, top: &OwnedFd, ro: bool) -> rustix::io::Result<()> {
    match how {
        Freeze::Superblock => freeze(top, ro),
        Freeze::Mount => {
            let mut f = MountFlags::BIND;
            if ro {
                f |= MountFlags::RDONLY;
            }
            rustix::mount::mount_remount(target.proc_path().as_path(), f, "")
        }
    }
}

fn freeze(top: &OwnedFd, ro: bool) -> rustix::io::Result<()> {
    let fs = rustix::mount::fspick(
        top,
        "",
        rustix::mount::FsPickFlags::FSPICK_CLOEXEC | rustix::mount::FsPickFlags::FSPICK_EMPTY_PATH,
    )?;
    rustix::mount::fsconfig_set_flag(&fs, if ro { "ro" } else { "rw" })?;
    rustix::mount::fsconfig_reconfigure(&fs)
}

/// Make the old generation read-only, retrying while files are open for
/// writing, for up to `wait`.
fn freeze_waiting(
    how: Freeze,
    target: &Target,
    top: &OwnedFd,
    wait: Duration,
) -> std::result::Result<(), SwapError> {
    let start = Instant::now();
    loop {
        let t = Instant::now();
        match freeze_with(how, target, top, true) {
            Ok(()) => {
                if std::env::var_os("LAYBAK_DEBUG").is_some() {
                    eprintln!("laybak: freeze ({how:?}) took {:?}", t.elapsed());
                }
                return Ok(());
            }
            Err(rustix::io::Errno::BUSY) if start.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(rustix::io::Errno::BUSY) => return Err(SwapError::Writers),
            Err(e) => {
                return Err(SwapError::Failed(
                    anyhow::Error::from(e).context("cannot freeze the volume read-only"),
                ));
            }
        }
    }
}

/// Attach detached mount `new` beneath the mount `top` is the root of.
fn mount_beneath(new: &OwnedFd, top: &OwnedFd) -> std::result::Result<(), SwapError> {
    match rustix::mount::move_mount(
        new,
        "",
        top,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH
            | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH
            | MoveMountFlags::MOVE_MOUNT_BENEATH,
    ) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL) => Err(SwapError::Unsupported(anyhow!(
            "this kernel cannot mount beneath (MOVE_MOUNT_BENEATH needs Linux 6.5)"
        ))),
        Err(e) => Err(SwapError::Failed(
            anyhow::Error::from(e).context("cannot mount the new generation"),
        )),
    }
}

/// While writers still write, do what a superblock freeze would otherwise
/// do inside its read-only window: write dirty data out (syncfs needs a
/// real descriptor, not `top`'s O_PATH one), and let the kernel drop the
/// superblock's unused dentries with a reconfigure that changes nothing
/// (reconfiguring a superblock always shrinks its dentry cache, which on a
/// tree a user just walked takes ~100 ms per 100k entries).
fn prepare_freeze(top: &OwnedFd) {
    if let Ok(fd) = rustix::fs::openat(
        top,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        let _ = rustix::fs::syncfs(&fd);
    }
    let t = Instant::now();
    let _ = freeze(top, false);
    if std::env::var_os("LAYBAK_DEBUG").is_some() {
        eprintln!(
            "laybak: dentry shrink before the freeze took {:?}",
            t.elapsed()
        );
    }
}

/// The pre-freeze work of a rotation (syncfs, dentry shrink) on the
/// overlay `source` mounted on top of `target`, early: the caller overlaps
/// it with other work before a rotation (opening the repository), so the
/// rotation's own, second one finds little to do. Nothing else on top is
/// touched.
pub fn prepare_rotation(target: &Target, source: &str) {
    let Ok(top) = target.fresh() else {
        return;
    };
    let ours = mount_id(&top)
        .ok()
        .and_then(|id| mount_by_id(id).ok().flatten())
        .is_some_and(|m| {
            // A reconfigure sets `rw`: never on a superblock made read-only.
            m.fstype == "overlay"
                && m.source == source
                && !m.super_options.split(',').any(|o| o == "ro")
        });
    if ours {
        prepare_freeze(&top);
    }
}

/// Replace the live overlay at `target` (mount id `live`) by a new
/// generation built from `spec`, with no moment at which the directory is
/// missing: the new one is created detached, the old one's superblock is
/// made read-only (which fails while any file is open for writing through
/// any mount of it, and then stops every write, bind mounts included), the
/// new one is attached beneath it (`MOVE_MOUNT_BENEATH`) and the old one
/// detached from above. Processes inside the old one keep a frozen,
/// read-only view; every new path lookup reaches the new generation.
///
/// # Errors
/// See [`SwapError`]; on every error the old generation is live and
/// writable again.
pub fn swap_generation(
    spec: &Spec,
    target: &Target,
    live: u64,
    wait: Duration,
) -> std::result::Result<(u64, OldGeneration), SwapError> {
    let top = target.fresh().map_err(SwapError::Failed)?;
    if mount_id(&top).map_err(SwapError::Failed)? != live {
        return Err(SwapError::Failed(anyhow!(
            "{} is not the volume's mount (another mount is on top of it)",
            target.shown.display()
        )));
    }
    let new = build(spec, MountAttrFlags::empty()).map_err(|e| {
        if e.chain()
            .any(|c| c.downcast_ref::<rustix::io::Errno>() == Some(&rustix::io::Errno::NOSYS))
            || e.to_string().contains("lowerdir+")
        {
            SwapError::Unsupported(e)
        } else {
            SwapError::Failed(e)
        }
    })?;
    // Only this mount of the superblock exists (and users cannot make hidden
    // copies): making the mount read-only stops every writer (and fails
    // while one has a file open), with no sync inside the window. Otherwise
    // the superblock, after writing dirty data out first so the read-only
    // window (writers get EROFS while overlay syncs the upper filesystem)
    // stays short.
    let dev = mount_by_id(live)
        .ok()
        .flatten()
        .map(|m| m.dev)
        .unwrap_or_default();
    // A mount-level freeze covers only that mount; any other mount of the
    // superblock (a bind mount, a copy in another namespace, possibly one
    // a user made and hid) could keep writing into the sealed layer.
    let how = if dev.is_empty() || users_can_copy_mounts() || mounted_elsewhere(&dev, live) {
        // Before the read-only window, while writers still write: write
        // dirty data out (syncfs needs a real descriptor, not `top`'s
        // O_PATH one), and let the kernel drop the superblock's unused
        // dentries with a reconfigure that changes nothing —
        // reconfiguring a superblock always shrinks its dentry cache, which
        // on a tree a user just walked takes ~100 ms per 100k entries and
        // would otherwise happen inside the read-only one.
        prepare_freeze(&top);
        Freeze::Superblock
    } else {
        Freeze::Mount
    };
    let start = Instant::now();
    let debug = std::env::var_os("LAYBAK_DEBUG").is_some();
    freeze_waiting(how, target, &top, wait)?;
    let thaw = |e: anyhow::Error| {
        let _ = freeze_with(how, target, &top, false);
        e
    };
    if let Err(e) = crate::failpoint::hit("frozen") {
        return Err(SwapError::Failed(thaw(e)));
    }
    let new_id = match mount_id(&new) {
        Ok(id) => id,
        Err(e) => return Err(SwapError::Failed(thaw(e))),
    };
    if let Err(e) = mount_beneath(&new, &top) {
        return Err(match e {
            SwapError::Unsupported(e) => SwapError::Unsupported(thaw(e)),
            SwapError::Failed(e) => SwapError::Failed(thaw(e)),
            other => other,
        });
    }
    // Lazily detach the frozen old generation from above: nothing can
    // write through it any more, so nothing is lost with it.
    if let Err(e) = crate::failpoint::hit("beneath").and_then(|()| detach_top(target)) {
        // Never thaw the old generation over a mounted new one: its writes
        // would go into a layer the new one stacks. The crash recovery
        // finishes the swap.
        return Err(SwapError::Stuck(e));
    }
    if debug {
        eprintln!(
            "laybak: read-only for {:?} (from the freeze's start)",
            start.elapsed()
        );
    }
    let old_id = id_and_dev_at(&top, Path::new(""), AtFlags::EMPTY_PATH).unwrap_or((0, 0));
    Ok((
        new_id,
        OldGeneration {
            id: old_id,
            hold: top,
        },
    ))
}

/// Attach detached mount `mnt` onto `target`; returns its mount id.
fn attach(mnt: &OwnedFd, target: &Target) -> Result<u64> {
    let id = mount_id(mnt)?;
    let dir = target.dir()?;
    rustix::mount::move_mount(
        mnt,
        "",
        &dir,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .with_context(|| format!("cannot attach the mount at {}", target.shown.display()))?;
    Ok(id)
}

/// The mount id of the mount `fd` is on.
///
/// # Errors
/// statx failed.
pub fn mount_id(fd: impl AsFd) -> Result<u64> {
    let st = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)
        .context("statx(STATX_MNT_ID)")?;
    Ok(st.stx_mnt_id)
}

/// `STATX_MNT_ID_UNIQUE` (Linux 6.8): a mount id that is never reused.
const MNT_ID_UNIQUE: u32 = 0x4000;

/// (never-reused id of the mount `p` (or `fd` when `p` is empty) is on,
/// falling back to the reusable one before Linux 6.8; device of its
/// filesystem).
fn id_and_dev_at(fd: impl AsFd, p: &Path, flags: AtFlags) -> Option<(u64, u64)> {
    let fd = fd.as_fd();
    let st = rustix::fs::statx(fd, p, flags, StatxFlags::from_bits_retain(MNT_ID_UNIQUE)).ok()?;
    let dev = (u64::from(st.stx_dev_major) << 32) | u64::from(st.stx_dev_minor);
    if st.stx_mask & MNT_ID_UNIQUE != 0 {
        return Some((st.stx_mnt_id, dev));
    }
    rustix::fs::statx(fd, p, flags, StatxFlags::MNT_ID)
        .ok()
        .map(|s| (s.stx_mnt_id, dev))
}

/// A generation's identity: its never-reused mount id, and the device of
/// its superblock (copies of the mount in other namespaces have other
/// mount ids but the same device; overlay reports one device for every
/// object when all layers are on one filesystem, as laybak's are).
pub type GenId = (u64, u64);

/// Identity of the top mount at `target`.
pub fn gen_id(target: &Target) -> Option<GenId> {
    let top = target.fresh().ok()?;
    id_and_dev_at(&top, Path::new(""), AtFlags::EMPTY_PATH)
}

/// A mount point: its parent directory, opened once (`O_PATH`, no symlink
/// followed on the way unless root owns it), and its name there (never
/// followed). Every mount laybak makes is attached to a descriptor of that
/// entry and every unmount goes through the parent's descriptor, so swapping
/// names while laybak works cannot move a mount or an unmount elsewhere.
/// No descriptor of the mounted tree itself is kept (it would keep the
/// mount busy).
pub struct Target {
    parent: OwnedFd,
    name: Vec<u8>,
    /// The directory itself, held from `open_held` to the mount, so the
    /// directory that was checked is the one mounted on.
    held: Option<OwnedFd>,
    /// Its path, for messages.
    pub shown: PathBuf,
}

impl Target {
    /// Open the parent of directory `path`.
    ///
    /// # Errors
    /// Missing, or reached through a user's symlink.
    pub fn open(path: &Path) -> Result<Target> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            bail!("{} cannot be a mount point", path.display());
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let parent = crate::fsx::open_dir_trusted(parent)
            .with_context(|| format!("cannot open mount point {}", path.display()))?;
        let t = Target {
            parent,
            name: name.as_bytes().to_vec(),
            held: None,
            shown: path.to_path_buf(),
        };
        drop(t.fresh()?);
        Ok(t)
    }

    /// As [`Target::open`], and hold the directory from now on: checks and
    /// the mount then apply to this very directory, whatever happens to
    /// its name meanwhile.
    ///
    /// # Errors
    /// As [`Target::open`].
    pub fn open_held(path: &Path) -> Result<Target> {
        let mut t = Target::open(path)?;
        t.held = Some(t.fresh()?);
        Ok(t)
    }

    /// The directory: the held one, or as it is now (the top mount on it).
    ///
    /// # Errors
    /// Missing, not a directory, or a symlink.
    pub fn dir(&self) -> Result<OwnedFd> {
        match &self.held {
            Some(fd) => Ok(rustix::io::fcntl_dupfd_cloexec(fd, 0)?),
            None => self.fresh(),
        }
    }

    fn fresh(&self) -> Result<OwnedFd> {
        rustix::fs::openat(
            &self.parent,
            crate::fsx::os(&self.name),
            rustix::fs::OFlags::PATH
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .with_context(|| {
            format!(
                "mount point {} is not a directory (a symlink is never followed)",
                self.shown.display()
            )
        })
    }

    /// Mount id of the top mount on the directory.
    ///
    /// # Errors
    /// It cannot be opened.
    pub fn top_id(&self) -> Result<u64> {
        mount_id(self.fresh()?)
    }

    /// `/proc/self/fd/<parent>/<name>`: a path that reaches the entry only
    /// through the parent's descriptor.
    fn proc_path(&self) -> PathBuf {
        use rustix::fd::AsFd;
        crate::fsx::proc_path(self.parent.as_fd(), &self.name)
    }
}

fn mount_legacy(spec: &Spec, t: &Target, flags: MountFlags) -> Result<u64> {
    let opts = legacy_options(spec, Some("null")).or_else(|_| legacy_options(spec, None))?;
    let c = std::ffi::CString::new(opts)?;
    // mount(2) takes a path: the directory's descriptor, through /proc.
    let dir = t.dir()?;
    let target = {
        use rustix::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
    };
    let target = target.as_path();
    let res = match rustix::mount::mount(
        spec.source.as_str(),
        target,
        "overlay",
        flags,
        Some(c.as_c_str()),
    ) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL) => {
            let opts = legacy_options(spec, None)?;
            let c = std::ffi::CString::new(opts)?;
            rustix::mount::mount(
                spec.source.as_str(),
                target,
                "overlay",
                flags,
                Some(c.as_c_str()),
            )
            .with_context(|| format!("mount(2) overlay on {}", t.shown.display()))
        }
        Err(e) => Err(e).with_context(|| format!("mount(2) overlay on {}", t.shown.display())),
    };
    res?;
    // The new mount is the top one at the target now.
    t.top_id()
}

/// Mount an overlay at `target` and verify its effective options. A
/// read-only view (no upper) is mounted `ro,nosuid,nodev`; a view needs at
/// least two lowers without an upper (the kernel's rule: add an empty one).
///
/// # Errors
/// The kernel refused, or the effective options are not what was asked.
pub fn mount(spec: &Spec, target: &Path) -> Result<u64> {
    mount_at(spec, &Target::open_held(target)?)
}

/// As [`mount`], onto an opened mount point. Returns the new mount's id.
///
/// # Errors
/// As [`mount`].
pub fn mount_at(spec: &Spec, target: &Target) -> Result<u64> {
    if spec.upper.is_none() && spec.lowers.len() < 2 {
        bail!("internal error: a read-only view needs two lower layers");
    }
    if spec.lowers.len() > 500 {
        bail!(
            "{} layers exceed the kernel's limit of 500: squash the volume",
            spec.lowers.len()
        );
    }
    let ro = spec.upper.is_none();
    let legacy_flags = || {
        if ro {
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV
        } else {
            MountFlags::empty()
        }
    };
    let id = if std::env::var_os("LAYBAK_FORCE_MOUNT2").is_some() {
        mount_legacy(spec, target, legacy_flags())?
    } else {
        let mut f = MountAttrFlags::empty();
        if ro {
            f |= MountAttrFlags::MOUNT_ATTR_RDONLY
                | MountAttrFlags::MOUNT_ATTR_NOSUID
                | MountAttrFlags::MOUNT_ATTR_NODEV;
        }
        match mount_new_api(spec, target, f) {
            Ok(id) => id,
            Err(e)
                if e.to_string().contains("lowerdir+")
                    || e.chain().any(|c| {
                        c.downcast_ref::<rustix::io::Errno>() == Some(&rustix::io::Errno::NOSYS)
                    }) =>
            {
                // Kernels before 6.8 do not know `lowerdir+`; kernels before
                // 5.2, seccomp filters and valgrind lack fsopen (ENOSYS).
                mount_legacy(spec, target, legacy_flags())?
            }
            Err(e) => return Err(e),
        }
    };
    if let Err(e) = verify_id(id, &target.shown) {
        let _ = unmount_id(id, target);
        return Err(e);
    }
    Ok(id)
}

/// Check the mount with id `id` (an overlay laybak just made) for
/// forbidden effective options.
///
/// # Errors
/// Not found, not overlay, or a forbidden option is in effect.
pub fn verify_id(id: u64, shown: &Path) -> Result<()> {
    let info =
        mount_by_id(id)?.ok_or_else(|| anyhow!("the mount made at {} is gone", shown.display()))?;
    check_options(&info, shown)
}

fn check_options(info: &MountInfo, shown: &Path) -> Result<()> {
    if info.fstype != "overlay" {
        bail!(
            "{} is a {} mount, not overlay",
            shown.display(),
            info.fstype
        );
    }
    for o in info.super_options.split(',') {
        if FORBIDDEN_EFFECTIVE.contains(&o) {
            bail!(
                "the kernel mounted {} with {o} although laybak asked otherwise (module parameter or distribution default?): refusing to use it",
                shown.display()
            );
        }
    }
    Ok(())
}

/// The mount with id `id`, if it is mounted in this namespace.
///
/// # Errors
/// mountinfo unreadable.
pub fn mount_by_id(id: u64) -> Result<Option<MountInfo>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    Ok(parse_mountinfo(&text).into_iter().find(|m| m.id == id))
}

/// Unmount the mount `id` if it is the top mount on `target`, through the
/// target's descriptor (never by a path someone could swap). Never lazy.
///
/// # Errors
/// Another mount is on top, or the kernel refused (EBUSY while in use).
pub fn unmount_id(id: u64, target: &Target) -> Result<()> {
    if target.top_id()? != id {
        bail!(
            "{} is not the mount laybak made there (another mount is on top): refusing to unmount it",
            target.shown.display()
        );
    }
    rustix::mount::unmount(target.proc_path().as_path(), UnmountFlags::NOFOLLOW)
        .with_context(|| format!("cannot unmount {}", target.shown.display()))
}

/// A private read-write bind mount of `src` at `target` (the volume's
/// backing view, which must not see the overlay later mounted on `src`).
///
/// # Errors
/// The kernel refused.
pub fn bind_private(src: &Path, target: &Path) -> Result<()> {
    // The source is a directory users may write around: clone it by
    // descriptor (a detached, private copy), attach it onto the target's
    // descriptor, then make sure its propagation is private.
    let s = Target::open(src)?.dir()?;
    let t = Target::open_held(target)?;
    let mnt = rustix::mount::open_tree(
        &s,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .with_context(|| format!("cannot clone {}", src.display()))?;
    attach(&mnt, &t)
        .with_context(|| format!("cannot bind {} at {}", src.display(), target.display()))?;
    rustix::mount::mount_change(target, MountPropagationFlags::PRIVATE)
        .with_context(|| format!("cannot make {} private", target.display()))
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountInfo {
    /// Mount id.
    pub id: u64,
    /// Device of its superblock, "major:minor".
    pub dev: String,
    /// Mount point.
    pub target: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Superblock options.
    pub super_options: String,
}

fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Parse mountinfo text (pure, for tests).
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.splitn(3, ' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        out.push(MountInfo {
            id: l[0].parse().unwrap_or(0),
            dev: l[2].to_string(),
            target: PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(l[4]))),
            fstype: r[0].to_string(),
            source: String::from_utf8_lossy(&unescape(r[1])).into_owned(),
            super_options: r[2].to_string(),
        });
    }
    out
}

/// The topmost mount at exactly `target`, if any.
///
/// # Errors
/// mountinfo unreadable.
pub fn find_mount(target: &Path) -> Result<Option<MountInfo>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let canon = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.target == canon))
}

/// Unmount once, without waiting.
///
/// # Errors
/// Any error from umount2 (EBUSY when in use).
pub fn unmount_now(target: &Path) -> rustix::io::Result<()> {
    // Through the parent's descriptor, never following the last name: a
    // user who renames directories around the volume cannot redirect it.
    let t = Target::open(target).map_err(|_| rustix::io::Errno::NOENT)?;
    rustix::mount::unmount(t.proc_path().as_path(), UnmountFlags::NOFOLLOW)
}

/// Processes that still use generation `which` (a detached old one), in
/// any mount namespace: through their cwd, root, an open file or a mapping.
pub fn mount_users(which: GenId) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    let on = |p: &Path| {
        id_and_dev_at(rustix::fs::CWD, p, AtFlags::empty())
            .is_some_and(|(id, dev)| id == which.0 || (which.1 != 0 && dev == which.1))
    };
    for ent in rd.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = ent.path();
        let mut used = on(&base.join("cwd")) || on(&base.join("root"));
        for sub in ["fd", "map_files"] {
            if used {
                break;
            }
            if let Ok(fds) = std::fs::read_dir(base.join(sub)) {
                used = fds.flatten().any(|f| on(&f.path()));
            }
        }
        if used {
            let comm = std::fs::read_to_string(base.join("comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            out.push((pid, comm));
        }
    }
    out
}

/// Processes with a file open for writing (or a shared writable mapping)
/// under `dir`: they block freezing a volume.
pub fn writers(dir: &Path) -> Vec<(u32, String, String)> {
    holders(dir)
        .into_iter()
        .filter_map(|(pid, comm, what)| {
            let w: Vec<&str> = what
                .split(", ")
                .filter(|x| x.contains("for writing"))
                .collect();
            (!w.is_empty()).then(|| (pid, comm, w.join(", ")))
        })
        .collect()
}

/// Processes holding something under `dir`: (pid, command, what).
pub fn holders(dir: &Path) -> Vec<(u32, String, String)> {
    let mut out = Vec::new();
    let dirb = dir.as_os_str().as_bytes();
    let under = |p: &Path| {
        let b = p.as_os_str().as_bytes();
        b == dirb || (b.starts_with(dirb) && b.get(dirb.len()) == Some(&b'/'))
    };
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for ent in rd.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = ent.path();
        let comm = std::fs::read_to_string(base.join("comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mut what = Vec::new();
        for link in ["cwd", "root"] {
            if let Ok(t) = std::fs::read_link(base.join(link))
                && under(&t)
            {
                what.push(link.to_string());
            }
        }
        if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            let mut reader = None;
            for fd in fds.flatten() {
                if let Ok(t) = std::fs::read_link(fd.path())
                    && under(&t)
                {
                    let flags = std::fs::read_to_string(base.join("fdinfo").join(fd.file_name()))
                        .ok()
                        .and_then(|i| {
                            i.lines()
                                .find_map(|l| l.strip_prefix("flags:"))
                                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                        })
                        .unwrap_or(0);
                    if flags & 0o3 != 0 {
                        what.push(format!("file {} open for writing", t.display()));
                        reader = None;
                        break;
                    }
                    reader.get_or_insert_with(|| format!("open file {}", t.display()));
                }
            }
            what.extend(reader);
        }
        if let Ok(maps) = std::fs::read_to_string(base.join("maps")) {
            let mapped: Vec<&str> = maps
                .lines()
                .filter(|l| {
                    l.split_whitespace()
                        .nth(5)
                        .is_some_and(|p| under(Path::new(p)))
                })
                .collect();
            // A shared writable mapping ("rw-s") writes like an open file.
            if mapped.iter().any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|p| p.starts_with("rw") && p.ends_with('s'))
            }) {
                what.push("shared writable mapping (for writing)".into());
            } else if !mapped.is_empty() {
                what.push("memory mapping".into());
            }
        }
        if !what.is_empty() {
            out.push((pid, comm, what.join(", ")));
        }
    }
    out
}

/// Unmount `target`, retrying for up to `wait` while it is busy. When it
/// stays busy, fail naming the processes that hold it. Never lazy.
///
/// # Errors
/// Still busy after `wait`, or another unmount error.
pub fn unmount_wait(target: &Path, wait: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        match unmount_now(target) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::BUSY) if start.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(rustix::io::Errno::BUSY) => {
                let h = holders(target);
                let list = if h.is_empty() {
                    "no process found in /proc (a submount or another mount namespace?)".to_string()
                } else {
                    h.iter()
                        .map(|(p, c, w)| format!("pid {p} ({c}): {w}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                return Err(crate::error::Busy(format!(
                    "{} is busy after waiting {}s: {list}; close those files or raise --wait",
                    target.display(),
                    wait.as_secs()
                ))
                .into());
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot unmount {}", target.display()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_string_has_every_option_and_escapes() {
        let spec = Spec {
            lowers: vec!["/a:b".into(), "/c".into()],
            upper: Some(("/u".into(), "/w".into())),
            source: "laybak".into(),
        };
        let s = legacy_options(&spec, Some("null")).unwrap();
        assert_eq!(
            s,
            "lowerdir=/a\\:b:/c,upperdir=/u,workdir=/w,redirect_dir=on,index=off,metacopy=off,nfs_export=off,xino=off,uuid=null"
        );
        let comma = Spec {
            lowers: vec!["/a,b".into()],
            upper: None,
            source: "x".into(),
        };
        assert!(legacy_options(&comma, None).is_err());
        let long = Spec {
            lowers: (0..200)
                .map(|i| PathBuf::from(format!("/very/long/path/to/layer/{i:020}")))
                .collect(),
            upper: None,
            source: "x".into(),
        };
        assert!(
            legacy_options(&long, None)
                .unwrap_err()
                .to_string()
                .contains("one-page")
        );
    }

    #[test]
    fn mountinfo_parsing() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - overlay laybak:vol rw,lowerdir+=/x,redirect_dir=nofollow\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].target, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].fstype, "overlay");
        assert_eq!(m[0].source, "laybak:vol");
        assert!(m[0].super_options.contains("redirect_dir=nofollow"));
    }
}

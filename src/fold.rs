//! Offline folding of one layer directory into the one below it, with
//! overlay semantics, by renames (no data is copied). Used to keep the live
//! chain short and to turn a volume back into a plain directory (`detach`).
//!
//! Both directories must be out of any mount. The fold is resumable: every
//! step removes what it has applied from the upper, so rerunning it after a
//! crash finishes the job.

use crate::scan::{OVL_PREFIX, read_xattrs};
use anyhow::{Context, Result};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

fn is_whiteout(md: &fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn is_opaque(p: &Path) -> Result<bool> {
    Ok(read_xattrs(p)?
        .iter()
        .any(|(k, v)| k.as_slice() == b"trusted.overlay.opaque" && v.as_slice() == b"y"))
}

fn remove_any(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => {
            fs::remove_dir_all(p).with_context(|| format!("cannot remove {}", p.display()))
        }
        Ok(_) => fs::remove_file(p).with_context(|| format!("cannot remove {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot stat {}", p.display())),
    }
}

/// Copy owner, mode, times and user xattrs of directory `from` onto `to`
/// (overlay bookkeeping xattrs are neither copied nor removed).
///
/// # Errors
/// Any syscall failure.
pub fn copy_dir_meta(from: &Path, to: &Path) -> Result<()> {
    let md = fs::symlink_metadata(from)?;
    let old: Vec<_> = read_xattrs(to)?
        .into_iter()
        .filter(|(k, _)| !k.starts_with(OVL_PREFIX))
        .collect();
    for (k, _) in &old {
        let _ = rustix::fs::lremovexattr(to, std::ffi::CString::new(k.clone())?.as_c_str());
    }
    for (k, v) in read_xattrs(from)? {
        if k.starts_with(OVL_PREFIX) {
            continue;
        }
        rustix::fs::lsetxattr(
            to,
            std::ffi::CString::new(k)?.as_c_str(),
            &v,
            rustix::fs::XattrFlags::empty(),
        )
        .with_context(|| format!("cannot copy xattrs to {}", to.display()))?;
    }
    std::os::unix::fs::lchown(to, Some(md.uid()), Some(md.gid()))?;
    rustix::fs::chmod(to, rustix::fs::Mode::from_raw_mode(md.mode() & 0o7777))?;
    set_times(to, &md)
}

fn set_times(to: &Path, md: &fs::Metadata) -> Result<()> {
    let t = |s: i64, n: i64| rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: n as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        to,
        &rustix::fs::Timestamps {
            last_access: t(md.atime(), md.atime_nsec()),
            last_modification: t(md.mtime(), md.mtime_nsec()),
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("cannot set times of {}", to.display()))
}

/// Fold directory `upper` into `lower`: whiteouts delete, opaque directories
/// replace, other directories merge (their metadata wins), everything else
/// replaces. `keep_markers` keeps opaque markers on moved directories (the
/// lower is not the bottom of a chain). `upper` is left empty.
///
/// # Errors
/// Any filesystem error; rerun to resume.
pub fn fold(upper: &Path, lower: &Path, keep_markers: bool) -> Result<()> {
    let upper_md = fs::symlink_metadata(upper)?;
    for ent in fs::read_dir(upper).with_context(|| format!("cannot list {}", upper.display()))? {
        let ent = ent?;
        let src = ent.path();
        let dst = lower.join(ent.file_name());
        let md = fs::symlink_metadata(&src)?;
        if is_whiteout(&md) {
            remove_any(&dst)?;
            fs::remove_file(&src)?;
        } else if md.is_dir() {
            let opaque = is_opaque(&src)?;
            let dst_is_dir = fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir());
            if opaque || !dst_is_dir {
                remove_any(&dst)?;
                if opaque && !keep_markers {
                    let _ = rustix::fs::lremovexattr(&src, "trusted.overlay.opaque");
                }
                fs::rename(&src, &dst).with_context(|| {
                    format!("cannot move {} to {}", src.display(), dst.display())
                })?;
            } else {
                fold(&src, &dst, keep_markers)?;
                fs::remove_dir(&src)?;
            }
        } else {
            if fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir()) {
                remove_any(&dst)?;
            }
            fs::rename(&src, &dst)
                .with_context(|| format!("cannot move {} to {}", src.display(), dst.display()))?;
        }
    }
    copy_dir_meta(upper, lower)?;
    set_times(lower, &upper_md)
}

/// Remove every whiteout and overlay xattr below `dir` (a flattened base
/// that becomes plain user data again).
///
/// # Errors
/// Any filesystem error.
pub fn strip_overlay_artifacts(dir: &Path) -> Result<()> {
    strip_xattrs(dir)?;
    let md = fs::symlink_metadata(dir)?;
    for ent in fs::read_dir(dir)? {
        let p = ent?.path();
        let m = fs::symlink_metadata(&p)?;
        if is_whiteout(&m) {
            fs::remove_file(&p)?;
        } else if m.is_dir() {
            strip_overlay_artifacts(&p)?;
        } else {
            strip_xattrs(&p)?;
        }
    }
    set_times(dir, &md)
}

fn strip_xattrs(p: &Path) -> Result<()> {
    for (k, _) in read_xattrs(p)? {
        if k.starts_with(OVL_PREFIX) && !k.starts_with(b"trusted.overlay.overlay.") {
            rustix::fs::lremovexattr(p, std::ffi::CString::new(k)?.as_c_str())
                .with_context(|| format!("cannot clean {}", p.display()))?;
        }
    }
    Ok(())
}

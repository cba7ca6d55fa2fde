//! Offline folding of one layer directory into the one below it, with
//! overlay semantics, by renames (no data is copied). Used to keep the live
//! chain short and to turn a volume back into a plain directory (`detach`).
//!
//! Both directories must be out of any mount. The fold is resumable: every
//! step removes what it has applied from the upper, so rerunning it after a
//! crash finishes the job.
//!
//! Layers hold directories that their users own and could write if they
//! could reach them, so everything here works through descriptors
//! ([`crate::fsx`]): each directory is opened once, relative to its parent,
//! without following symlinks, and checked to be the directory that was
//! looked at; metadata is changed with `fchmod`/`fchown`/`fsetxattr`; entries
//! are removed and moved with `unlinkat`/`renameat` relative to those
//! descriptors. A name swapped under the fold makes it fail; it never
//! changes anything outside the two layers.

use crate::fsx::{self, dev_ino, is_dir, is_whiteout};
use crate::ovl::OPAQUE;
use anyhow::{Context, Result, bail};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// Not overlay's own bookkeeping: the xattrs a fold carries over.
pub fn is_user_xattr(k: &[u8]) -> bool {
    crate::ovl::is_plain_user(k)
}

fn open(p: &Path) -> Result<OwnedFd> {
    fsx::open_dir_path(p).with_context(|| format!("cannot open {}", p.display()))
}

/// Open subdirectory `name` of `dir`, checking it is the directory `want`
/// (dev, ino) that was just looked at.
fn open_checked(dir: BorrowedFd<'_>, name: &[u8], want: (u64, u64)) -> Result<OwnedFd> {
    let sub = fsx::open_subdir(dir, name)
        .with_context(|| format!("cannot open {}", crate::layer::show(name)))?;
    if dev_ino(&rustix::fs::fstat(&sub)?) != want {
        bail!(
            "{} changed while laybak was folding layers; rerun the command",
            crate::layer::show(name)
        );
    }
    Ok(sub)
}

fn is_opaque(dir: BorrowedFd<'_>) -> Result<bool> {
    let x = fsx::xattrs_fd(dir)?;
    Ok(crate::ovl::is_opaque(
        x.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
    ))
}

/// Copy owner, mode, times and user xattrs of directory `from` onto `to`
/// (overlay bookkeeping xattrs are neither copied nor removed).
///
/// # Errors
/// Any syscall failure.
pub fn copy_dir_meta(from: &Path, to: &Path) -> Result<()> {
    let (f, t) = (open(from)?, open(to)?);
    fsx::copy_meta_fd(f.as_fd(), t.as_fd(), is_user_xattr)
        .with_context(|| format!("cannot copy metadata to {}", to.display()))
}

/// Fold directory `upper` into `lower`: whiteouts delete, opaque directories
/// replace, other directories merge (their metadata wins), everything else
/// replaces. `keep_markers` keeps opaque markers on moved directories (the
/// lower is not the bottom of a chain). `upper` is left empty.
///
/// # Errors
/// Any filesystem error; rerun to resume.
pub fn fold(upper: &Path, lower: &Path, keep_markers: bool) -> Result<()> {
    let (u, l) = (open(upper)?, open(lower)?);
    fold_fd(u.as_fd(), l.as_fd(), keep_markers)
        .with_context(|| format!("folding {} into {}", upper.display(), lower.display()))
}

fn fold_fd(upper: BorrowedFd<'_>, lower: BorrowedFd<'_>, keep_markers: bool) -> Result<()> {
    let show = crate::layer::show;
    // Moving entries out changes the upper's times: keep the original ones.
    let up_st = rustix::fs::fstat(upper)?;
    for name in fsx::names(upper)? {
        let Some(st) = fsx::stat_at(upper, &name)? else {
            continue;
        };
        let dst = fsx::stat_at(lower, &name)?;
        let dst_is_dir = dst.as_ref().is_some_and(is_dir);
        if is_whiteout(&st) {
            fsx::remove_all_at(lower, &name)
                .with_context(|| format!("cannot remove {}", show(&name)))?;
            rustix::fs::unlinkat(upper, fsx::os(&name), rustix::fs::AtFlags::empty())
                .with_context(|| format!("cannot remove whiteout {}", show(&name)))?;
        } else if is_dir(&st) {
            let sub = open_checked(upper, &name, dev_ino(&st))?;
            let opaque = is_opaque(sub.as_fd())?;
            if opaque || !dst_is_dir {
                fsx::remove_all_at(lower, &name)
                    .with_context(|| format!("cannot remove {}", show(&name)))?;
                if opaque && !keep_markers {
                    match rustix::fs::fremovexattr(&sub, fsx::os(OPAQUE)) {
                        Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                drop(sub);
                fsx::rename_at(upper, &name, lower, &name)
                    .with_context(|| format!("cannot move {}", show(&name)))?;
            } else {
                let dst = dst.expect("checked above");
                let dsub = open_checked(lower, &name, dev_ino(&dst))?;
                fold_fd(sub.as_fd(), dsub.as_fd(), keep_markers)
                    .with_context(|| format!("in {}", show(&name)))?;
                drop(sub);
                rustix::fs::unlinkat(upper, fsx::os(&name), rustix::fs::AtFlags::REMOVEDIR)
                    .with_context(|| format!("cannot remove {}", show(&name)))?;
            }
        } else {
            if dst_is_dir {
                fsx::remove_all_at(lower, &name)
                    .with_context(|| format!("cannot remove {}", show(&name)))?;
            }
            fsx::rename_at(upper, &name, lower, &name)
                .with_context(|| format!("cannot move {}", show(&name)))?;
        }
    }
    // The merged directory's own metadata comes from the upper; its times
    // last, since the moves above changed the lower's mtime.
    fsx::copy_meta_fd(upper, lower, is_user_xattr)?;
    fsx::set_times_fd(
        lower,
        (up_st.st_atime, up_st.st_atime_nsec as i64),
        (up_st.st_mtime, up_st.st_mtime_nsec as i64),
    )?;
    Ok(())
}

/// Remove every whiteout and overlay xattr below `dir` (a flattened base
/// that becomes plain user data again).
///
/// # Errors
/// Any filesystem error.
pub fn strip_overlay_artifacts(dir: &Path) -> Result<()> {
    let d = open(dir)?;
    strip_fd(d.as_fd()).with_context(|| format!("cleaning {}", dir.display()))
}

use crate::ovl::is_bookkeeping;

fn strip_fd(dir: BorrowedFd<'_>) -> Result<()> {
    let show = crate::layer::show;
    let st = rustix::fs::fstat(dir)?;
    for (k, _) in fsx::xattrs_fd(dir)? {
        if is_bookkeeping(&k) {
            rustix::fs::fremovexattr(dir, fsx::os(&k))?;
        }
    }
    for name in fsx::names(dir)? {
        let Some(m) = fsx::stat_at(dir, &name)? else {
            continue;
        };
        if is_whiteout(&m) {
            rustix::fs::unlinkat(dir, fsx::os(&name), rustix::fs::AtFlags::empty())
                .with_context(|| format!("cannot remove whiteout {}", show(&name)))?;
        } else if is_dir(&m) {
            let sub = open_checked(dir, &name, dev_ino(&m))?;
            strip_fd(sub.as_fd()).with_context(|| format!("in {}", show(&name)))?;
        } else {
            for (k, _) in fsx::xattrs_at(dir, &name)? {
                if is_bookkeeping(&k) {
                    fsx::remove_xattr_at(dir, &name, &k)
                        .with_context(|| format!("cannot clean {}", show(&name)))?;
                }
            }
        }
    }
    // Removing whiteouts changed the directory's mtime: put it back.
    fsx::set_times_fd(
        dir,
        (st.st_atime, st.st_atime_nsec as i64),
        (st.st_mtime, st.st_mtime_nsec as i64),
    )?;
    Ok(())
}

/// Xattrs a merged layer keeps: the user's, the escaped user
/// `trusted.overlay.overlay.*`, and the opaque marker; overlay's other
/// bookkeeping (origin, impure) describes the old upper, not the new layer.
fn keep_in_layer(k: &[u8]) -> bool {
    crate::ovl::kept_in_merge(k)
}

/// Owner, mode, kept xattrs and times of open directory `from` onto `to`
/// (a directory of a layer being built, which holds only kept xattrs).
fn copy_layer_meta(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> Result<()> {
    Ok(fsx::copy_meta_fd(from, to, keep_in_layer)?)
}

fn link(from: BorrowedFd<'_>, to: BorrowedFd<'_>, name: &[u8]) -> Result<()> {
    rustix::fs::linkat(
        from,
        fsx::os(name),
        to,
        fsx::os(name),
        rustix::fs::AtFlags::empty(),
    )
    .with_context(|| format!("cannot link {}", crate::layer::show(name)))
}

fn mkdir_open(dir: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd> {
    rustix::fs::mkdirat(dir, fsx::os(name), rustix::fs::Mode::from_raw_mode(0o700))
        .with_context(|| format!("cannot create {}", crate::layer::show(name)))?;
    Ok(fsx::open_subdir(dir, name)?)
}

/// Copy the tree of `src` into the empty directory `dst`: directories are
/// made anew, everything else is hard-linked (no data is copied).
fn clone_tree(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> Result<()> {
    for name in fsx::names(src)? {
        let Some(st) = fsx::stat_at(src, &name)? else {
            continue;
        };
        if is_dir(&st) {
            let s = open_checked(src, &name, dev_ino(&st))?;
            let d = mkdir_open(dst, &name)?;
            clone_tree(s.as_fd(), d.as_fd())?;
            copy_layer_meta(s.as_fd(), d.as_fd())?;
        } else {
            link(src, dst, &name)?;
        }
    }
    Ok(())
}

fn set_opaque(dir: BorrowedFd<'_>) -> Result<()> {
    rustix::fs::fsetxattr(
        dir,
        fsx::os(OPAQUE),
        crate::ovl::OPAQUE_YES,
        rustix::fs::XattrFlags::empty(),
    )?;
    Ok(())
}

/// Apply layer `upper` onto `out` (a copy of the layer below it) with the
/// semantics of two adjacent layers squashed into one that still has
/// layers below it: whiteouts stay whiteouts, an opaque directory replaces,
/// a directory over a directory merges (the older one's opacity stays, the
/// newer one's metadata wins), a directory over a whiteout or a
/// non-directory becomes opaque (it must hide what lies below), anything
/// else replaces. `upper` is only read.
fn apply_fd(upper: BorrowedFd<'_>, out: BorrowedFd<'_>) -> Result<()> {
    let show = crate::layer::show;
    for name in fsx::names(upper)? {
        let Some(st) = fsx::stat_at(upper, &name)? else {
            continue;
        };
        let dst = fsx::stat_at(out, &name)?;
        if is_whiteout(&st) || !is_dir(&st) {
            fsx::remove_all_at(out, &name)
                .with_context(|| format!("cannot replace {}", show(&name)))?;
            link(upper, out, &name)?;
            continue;
        }
        let sub = open_checked(upper, &name, dev_ino(&st))?;
        match dst {
            Some(d) if is_dir(&d) && !is_opaque(sub.as_fd())? => {
                let o = open_checked(out, &name, dev_ino(&d))?;
                let was_opaque = is_opaque(o.as_fd())?;
                apply_fd(sub.as_fd(), o.as_fd()).with_context(|| format!("in {}", show(&name)))?;
                copy_layer_meta(sub.as_fd(), o.as_fd())?;
                if was_opaque {
                    set_opaque(o.as_fd())?;
                }
            }
            d => {
                let hides = d.is_some();
                fsx::remove_all_at(out, &name)
                    .with_context(|| format!("cannot replace {}", show(&name)))?;
                let o = mkdir_open(out, &name)?;
                clone_tree(sub.as_fd(), o.as_fd())?;
                copy_layer_meta(sub.as_fd(), o.as_fd())?;
                if hides {
                    set_opaque(o.as_fd())?;
                }
            }
        }
    }
    Ok(())
}

/// Build `out` (an empty directory) as the merge of the adjacent layers
/// `lower` and `upper` (not the bottom of the chain), by hard links: the two
/// layers are only read, so a mount that stacks them (a live generation, an
/// old one a process is still inside, a historical mount) never sees them
/// change. Costs the entries of the two layers, not their data.
///
/// # Errors
/// Any filesystem error; `out` is then garbage to remove.
pub fn merge_into(lower: &Path, upper: &Path, out: &Path) -> Result<()> {
    let (l, u, o) = (open(lower)?, open(upper)?, open(out)?);
    clone_tree(l.as_fd(), o.as_fd())
        .and_then(|()| apply_fd(u.as_fd(), o.as_fd()))
        .and_then(|()| copy_layer_meta(u.as_fd(), o.as_fd()))
        .with_context(|| {
            format!(
                "merging {} and {} into {}",
                lower.display(),
                upper.display(),
                out.display()
            )
        })?;
    rustix::fs::syncfs(&o)?;
    Ok(())
}

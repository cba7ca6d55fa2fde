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
use crate::layer::{DirKind, show};
use crate::ovl::OPAQUE;
use crate::stack;
use anyhow::{Context, Result, bail};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use std::cell::RefCell;
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

/// Fold directory `upper` into `lower`, the bottom of its chain, in place
/// and by renames (no data is copied, the cost is the upper's entries).
/// What goes where is the overlay rule ([`stack::Model`] over the two
/// directories): a name the upper hides (a whiteout) is removed below, a
/// directory that merges with the one below is folded into it (its
/// metadata wins), anything else — a file, an opaque directory, a directory
/// over a non-directory — replaces what was below, without its opaque
/// marker. `upper` must not hold a renamed directory: those layers are
/// built fresh instead ([`build`]), since the kernel leaves offline changes
/// to redirected layers undefined. `upper` is left empty.
///
/// # Errors
/// Any filesystem error, or a renamed directory; rerun to resume.
pub fn fold(upper: &Path, lower: &Path) -> Result<()> {
    let src = Dirs::open(&[lower, upper])?;
    let model = stack::Model::new(&src, false);
    let (u, l) = (open(upper)?, open(lower)?);
    fold_at(&src, &model, u.as_fd(), l.as_fd(), b"", &model.root())
        .and_then(|()| src.check())
        .with_context(|| format!("folding {} into {}", upper.display(), lower.display()))
}

fn fold_at(
    src: &Dirs,
    model: &stack::Model<'_, Dirs>,
    upper: BorrowedFd<'_>,
    lower: BorrowedFd<'_>,
    path: &[u8],
    stack: &[stack::Slot],
) -> Result<()> {
    use stack::Slot;
    let show = crate::layer::show;
    // Moving entries out changes the upper's times: keep the original ones.
    let up_st = rustix::fs::fstat(upper)?;
    for name in fsx::names(upper)? {
        let Some(st) = fsx::stat_at(upper, &name)? else {
            continue;
        };
        let here = stack::join(path, &name);
        // Every step changes the layers: no descriptor kept from before.
        src.forget();
        let child = model.lookup(stack, &name);
        src.check()?;
        match child.as_slice() {
            [] => {
                fsx::remove_all_at(lower, &name)
                    .with_context(|| format!("cannot remove {}", show(&here)))?;
                rustix::fs::unlinkat(upper, fsx::os(&name), rustix::fs::AtFlags::empty())
                    .with_context(|| format!("cannot remove whiteout {}", show(&here)))?;
            }
            [Slot::Layer(1, _), Slot::Layer(0, p)] if *p == here => {
                let dst = fsx::stat_at(lower, &name)?
                    .ok_or_else(|| anyhow::anyhow!("{} vanished", show(&here)))?;
                let sub = open_checked(upper, &name, dev_ino(&st))?;
                let dsub = open_checked(lower, &name, dev_ino(&dst))?;
                fold_at(src, model, sub.as_fd(), dsub.as_fd(), &here, &child)
                    .with_context(|| format!("in {}", show(&name)))?;
                drop(sub);
                rustix::fs::unlinkat(upper, fsx::os(&name), rustix::fs::AtFlags::REMOVEDIR)
                    .with_context(|| format!("cannot remove {}", show(&here)))?;
            }
            [Slot::Layer(1, _)] => {
                if is_dir(&st) {
                    let sub = open_checked(upper, &name, dev_ino(&st))?;
                    match rustix::fs::fremovexattr(&sub, fsx::os(OPAQUE)) {
                        Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                fsx::remove_all_at(lower, &name)
                    .with_context(|| format!("cannot remove {}", show(&here)))?;
                fsx::rename_at(upper, &name, lower, &name)
                    .with_context(|| format!("cannot move {}", show(&here)))?;
            }
            _ => bail!(
                "{} is a renamed directory; such a layer is folded by building a fresh one",
                show(&here)
            ),
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

/// A directory of a layer kept open: its path there and descriptor.
type OpenDir = (Vec<u8>, OwnedFd);

/// Layer directories as a [`stack::Source`], read through descriptors
/// beneath each layer's root (`RESOLVE_BENEATH`, no symlinks). The last
/// directory opened in each layer is kept open: the rule asks about one
/// directory's names one after another. The first error met (anything but
/// "not there") is kept and reported by [`Dirs::check`], so a layer that
/// cannot be read never passes for an empty one.
pub struct Dirs {
    roots: Vec<OwnedFd>,
    last: RefCell<Vec<Option<OpenDir>>>,
    error: RefCell<Option<anyhow::Error>>,
}

impl Dirs {
    /// Open the layer directories `layers`, bottom first.
    ///
    /// # Errors
    /// A layer that cannot be opened.
    pub fn open(layers: &[&Path]) -> Result<Self> {
        let roots = layers.iter().map(|p| open(p)).collect::<Result<Vec<_>>>()?;
        let last = RefCell::new((0..roots.len()).map(|_| None).collect());
        Ok(Self {
            roots,
            last,
            error: RefCell::new(None),
        })
    }

    fn fail(&self, e: anyhow::Error) {
        self.error.borrow_mut().get_or_insert(e);
    }

    /// Drop the directories kept open (after the layers changed).
    pub fn forget(&self) {
        for l in self.last.borrow_mut().iter_mut() {
            *l = None;
        }
    }

    /// The first error any question met.
    ///
    /// # Errors
    /// That error.
    pub fn check(&self) -> Result<()> {
        match self.error.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Run `f` on directory `dir` of `layer` (`None`: not a directory there).
    fn with_dir<T>(
        &self,
        layer: usize,
        dir: &[u8],
        f: impl FnOnce(BorrowedFd<'_>) -> T,
    ) -> Option<T> {
        if dir.is_empty() {
            return Some(f(self.roots[layer].as_fd()));
        }
        let mut last = self.last.borrow_mut();
        if let Some((p, fd)) = &last[layer]
            && p == dir
        {
            return Some(f(fd.as_fd()));
        }
        match fsx::open_beneath(&self.roots[layer], dir, fsx::dir_flags()) {
            Ok(fd) => {
                let r = f(fd.as_fd());
                last[layer] = Some((dir.to_vec(), fd));
                Some(r)
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error()) =>
            {
                None
            }
            Err(e) => {
                self.fail(anyhow::Error::new(e).context(format!("cannot open {}", show(dir))));
                None
            }
        }
    }

    /// A real entry's stat and, for a directory, its xattrs.
    fn stat(&self, layer: usize, path: &[u8]) -> Option<rustix::fs::Stat> {
        let (par, name) = crate::layer::split(path);
        self.with_dir(layer, par, |d| fsx::stat_at(d, name))?
            .map_err(|e| {
                self.fail(anyhow::Error::new(e).context(format!("cannot stat {}", show(path))))
            })
            .ok()
            .flatten()
    }
}

impl stack::Source for Dirs {
    fn count(&self) -> usize {
        self.roots.len()
    }
    fn kind(&self, layer: usize, path: &[u8]) -> Option<stack::Kind> {
        if path.is_empty() {
            // Overlay ignores xattrs on layer roots.
            return Some(stack::Kind::Dir(DirKind::Merge));
        }
        let st = self.stat(layer, path)?;
        if is_whiteout(&st) {
            return Some(stack::Kind::Whiteout);
        }
        if !is_dir(&st) {
            return Some(stack::Kind::Other);
        }
        let x = self
            .with_dir(layer, path, |d| fsx::xattrs_fd(d))?
            .map_err(|e| {
                self.fail(
                    anyhow::Error::new(e)
                        .context(format!("cannot read the xattrs of {}", show(path))),
                )
            })
            .ok()?;
        let (mut opaque, mut redirect) = (false, None);
        for (k, v) in x.iter().filter(|(k, _)| crate::ovl::is_bookkeeping(k)) {
            match crate::ovl::interpret(k, v) {
                crate::ovl::Attr::Opaque => opaque = true,
                crate::ovl::Attr::Redirect(r) => redirect = Some(r),
                crate::ovl::Attr::Refused(why) => {
                    self.fail(anyhow::anyhow!("{} {why}", show(path)))
                }
                crate::ovl::Attr::Bookkeeping | crate::ovl::Attr::User => {}
            }
        }
        Some(stack::Kind::Dir(crate::ovl::dir_kind(opaque, redirect)))
    }
    fn names(&self, layer: usize, dir: &[u8]) -> Vec<Vec<u8>> {
        let mut v = self
            .with_dir(layer, dir, |d| fsx::names(d))
            .and_then(|r| {
                r.map_err(|e| {
                    self.fail(anyhow::Error::new(e).context(format!("cannot list {}", show(dir))))
                })
                .ok()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Whether any directory below `dir` is a renamed one (holds
/// `trusted.overlay.redirect`).
///
/// # Errors
/// A directory that cannot be read.
pub fn has_redirects(dir: &Path) -> Result<bool> {
    fn walk(d: BorrowedFd<'_>) -> Result<bool> {
        for name in fsx::names(d)? {
            let Some(st) = fsx::stat_at(d, &name)? else {
                continue;
            };
            if is_dir(&st) {
                let sub = open_checked(d, &name, dev_ino(&st))?;
                if fsx::xattrs_fd(&sub)?
                    .iter()
                    .any(|(k, _)| k == crate::ovl::REDIRECT)
                    || walk(sub.as_fd())?
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
    let d = open(dir)?;
    walk(d.as_fd()).with_context(|| format!("reading {}", dir.display()))
}

/// Build `out` (an empty directory) as one layer with the effect of the
/// adjacent layer directories `layers` (bottom first), by hard links: the
/// layers are only read, so a mount that stacks them (a live generation, an
/// old one a process is still inside, a historical mount) never sees them
/// change. What goes where is [`stack::plan`], the same rule restore and
/// squash use; with `bottom` (nothing is below the result) it is the plain
/// merged tree. Costs the entries of the result, not their data.
///
/// # Errors
/// Any filesystem error; `out` is then garbage to remove.
pub fn build(layers: &[&Path], out: &Path, bottom: bool) -> Result<()> {
    let src = Dirs::open(layers)?;
    let plan = stack::plan(&src, bottom);
    src.check()?;
    let o = open(out)?;
    build_fd(&src, &plan, o.as_fd()).with_context(|| format!("building {}", out.display()))?;
    rustix::fs::syncfs(&o)?;
    Ok(())
}

fn build_fd(src: &Dirs, plan: &[stack::Planned], out: BorrowedFd<'_>) -> Result<()> {
    use rustix::fs::{AtFlags, FileType, Mode};
    let mut linked: std::collections::HashSet<(usize, &[u8])> = Default::default();
    // Directories made, with where their metadata comes from: their times
    // are set last, deepest first (making children changes them).
    let mut made: Vec<(&[u8], usize, &[u8])> = Vec::new();
    // The output directory entries go into, kept open: siblings come one
    // after another in path order, and a directory just made is often the
    // next one's parent.
    let mut cur: Option<OpenDir> = None;
    for p in plan {
        let (par, name) = crate::layer::split(&p.path);
        if !p.path.is_empty() && cur.as_ref().is_none_or(|(c, _)| c.as_slice() != par) {
            let fd = fsx::open_beneath(out, par, fsx::dir_flags())
                .with_context(|| format!("cannot open {}", show(par)))?;
            cur = Some((par.to_vec(), fd));
        }
        let pdir = if p.path.is_empty() {
            None
        } else {
            cur.as_ref().map(|(_, fd)| fd.as_fd())
        };
        let made_dir = match (&p.from, &p.dir) {
            (None, _) => {
                let pdir = pdir.ok_or_else(|| anyhow::anyhow!("whiteout at the root"))?;
                rustix::fs::mknodat(
                    pdir,
                    fsx::os(name),
                    FileType::CharacterDevice,
                    Mode::empty(),
                    0,
                )
                .with_context(|| format!("cannot make whiteout {}", show(&p.path)))?;
                None
            }
            (Some((l, real)), Some(kind)) => {
                let new = match pdir {
                    None => fsx::open_beneath(out, b"", fsx::dir_flags())?,
                    Some(pd) => mkdir_open(pd, name)?,
                };
                src.with_dir(*l, real, |d| {
                    fsx::copy_meta_fd(d, new.as_fd(), |k| !crate::ovl::is_bookkeeping(k))
                })
                .ok_or_else(|| anyhow::anyhow!("{} is gone", show(real)))??;
                if let Some((k, v)) = crate::ovl::dir_xattr(kind) {
                    rustix::fs::fsetxattr(&new, fsx::os(&k), &v, rustix::fs::XattrFlags::empty())
                        .with_context(|| format!("cannot mark {}", show(&p.path)))?;
                }
                made.push((&p.path, *l, real));
                Some(new)
            }
            (Some((l, real)), None) => {
                if !linked.insert((*l, real.as_slice())) {
                    bail!(
                        "the layers show {} under two names; not merging them",
                        show(real)
                    );
                }
                let (rpar, rname) = crate::layer::split(real);
                let pdir = pdir.ok_or_else(|| anyhow::anyhow!("a file at the root"))?;
                src.with_dir(*l, rpar, |d| {
                    rustix::fs::linkat(d, fsx::os(rname), pdir, fsx::os(name), AtFlags::empty())
                })
                .ok_or_else(|| anyhow::anyhow!("{} is gone", show(real)))?
                .with_context(|| format!("cannot link {}", show(&p.path)))?;
                None
            }
        };
        if let Some(fd) = made_dir {
            cur = Some((p.path.clone(), fd));
        }
    }
    src.check()?;
    for (path, l, real) in made.into_iter().rev() {
        let st = src
            .with_dir(l, real, |d| rustix::fs::fstat(d))
            .ok_or_else(|| anyhow::anyhow!("{} is gone", show(real)))??;
        let d = fsx::open_beneath(out, path, fsx::dir_flags())?;
        fsx::set_times_fd(
            &d,
            (st.st_atime, st.st_atime_nsec as i64),
            (st.st_mtime, st.st_mtime_nsec as i64),
        )?;
    }
    Ok(())
}

fn mkdir_open(dir: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd> {
    rustix::fs::mkdirat(dir, fsx::os(name), rustix::fs::Mode::from_raw_mode(0o700))
        .with_context(|| format!("cannot create {}", crate::layer::show(name)))?;
    Ok(fsx::open_subdir(dir, name)?)
}

/// Build `out` (an empty directory) as the merge of the adjacent layers
/// `lower` and `upper` (not the bottom of the chain): [`build`].
///
/// # Errors
/// Any filesystem error; `out` is then garbage to remove.
pub fn merge_into(lower: &Path, upper: &Path, out: &Path) -> Result<()> {
    build(&[lower, upper], out, false).with_context(|| {
        format!(
            "merging {} and {} into {}",
            lower.display(),
            upper.display(),
            out.display()
        )
    })
}

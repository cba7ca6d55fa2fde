//! A volume's life: attach (contents become the base layer), up and down
//! (mount and unmount), detach (a plain directory again).

use super::*;

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
pub(super) fn probe_fs(vol: &rustix::fd::OwnedFd) -> Result<()> {
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

pub(super) fn canonical_or(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Places attach refuses, before anything is moved: inside (or around)
/// another volume, inside any overlay, over mount points, or where the state
/// dir or the repository would end up inside the volume (or the volume
/// inside them).
pub(super) fn refuse_attach_place(
    path: &Path,
    state_dir: &Path,
    repo: &Repo,
    vols: &[Volume],
) -> Result<()> {
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
    refuse_attach(state_dir, repo, &path, &name)?;
    // Refuse overlay artefacts in user data before touching anything.
    scan::check_tree(&path, Source::Base)?;
    let root_md = fs::symlink_metadata(&path)?;
    let store = path.join(STORE);
    make_store(&path, &store)?;
    let st = new_state(
        name,
        &path,
        repo,
        opts.max_layers,
        opts.tags,
        (root_md.mtime(), root_md.mtime_nsec()),
    );
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

/// Everything attach refuses before it changes anything: a path or name
/// already attached, an overlay, a place laybak must not stack on, a
/// leftover layer store.
fn refuse_attach(state_dir: &Path, repo: &Repo, path: &Path, name: &str) -> Result<()> {
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
    if overlay::find_mount(path)?.is_some_and(|m| m.fstype == "overlay") {
        bail!(
            "{} is already an overlay mount: laybak will not stack on it",
            path.display()
        );
    }
    refuse_attach_place(path, state_dir, repo, &existing)?;
    if path.join(STORE).exists() {
        bail!(
            "{} already contains {STORE}: an earlier attach was interrupted or the data belongs to another laybak; remove it or run `laybak up`",
            path.display()
        );
    }
    Ok(())
}

/// Create the layer store in the volume directory and probe that its
/// filesystem can hold overlay layers; on failure remove only what was made.
fn make_store(path: &Path, store: &Path) -> Result<()> {
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(store)
            .with_context(|| format!("cannot create {}", store.display()))?;
    }
    let vfd = crate::fsx::open_dir_path(path)
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
    Ok(())
}

/// The state of a volume being attached: layer 1 takes the contents, 2 is
/// the first upper.
fn new_state(
    name: String,
    path: &Path,
    repo: &Repo,
    max_layers: usize,
    tags: Vec<String>,
    root_mtime: (i64, i64),
) -> VolumeState {
    VolumeState {
        version: 1,
        name,
        path: path.to_path_buf(),
        repo: repo.location.clone(),
        repo_encrypted: repo.is_encrypted(),
        max_layers: max_layers.clamp(2, 400),
        phase: Phase::Attaching,
        layers: vec![LocalLayer {
            seq: 1,
            sealed: Time::now(),
            tags,
            archived: Vec::new(),
            writing: None,
            entries: 0,
        }],
        upper: 2,
        next_seq: 3,
        last_snapshot: None,
        folding: None,
        up: true,
        attach_root_mtime: Some(root_mtime),
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
    }
}

/// Move the volume's contents into the base layer (resumable), then mount.
pub(super) fn finish_attach(vol: &mut Volume) -> Result<()> {
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

/// A chain with renamed directories above its base is flattened in one
/// build by hard links ([`fold::build`], the rule restore uses) instead of
/// folds by renames: the kernel leaves offline changes to redirected layers
/// undefined (RESEARCH.md A.8). The new base and an empty upper replace
/// the chain in one state write; the old directories are removed after.
fn flatten_renamed(vol: &mut Volume) -> Result<()> {
    let mut seqs: Vec<u64> = vol.st.layers.iter().map(|l| l.seq).collect();
    seqs.push(vol.st.upper);
    let mut dirs = Vec::new();
    let mut renamed = false;
    for (i, s) in seqs.iter().enumerate() {
        let d = vol.layer_dir(*s);
        if d.exists() {
            renamed = renamed || (i > 0 && fold::has_redirects(&d)?);
            dirs.push(d);
        }
    }
    if !renamed {
        return Ok(());
    }
    let (f, u) = (vol.st.next_seq, vol.st.next_seq + 1);
    vol.st.next_seq += 2;
    vol.save()?;
    let out = vol.layer_dir(f);
    let _ = fs::remove_dir_all(&out);
    crate::backend::private_dirs(&out)?;
    let refs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    fold::build(&refs, &out, true)?;
    crate::failpoint::hit("detach-fold")?;
    new_layer_dir(&vol.layer_dir(u), &out)?;
    let mut base = vol.st.layers[0].clone();
    base.seq = f;
    for l in &vol.st.layers[1..] {
        base.archived.extend(l.archived.iter().cloned());
        base.entries += l.entries;
    }
    vol.st.layers = vec![base];
    vol.st.upper = u;
    vol.save()?;
    for d in dirs {
        fs::remove_dir_all(&d).with_context(|| format!("cannot remove {}", d.display()))?;
    }
    Ok(())
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
    if vol.st.detach_store.is_none() {
        flatten_renamed(vol)?;
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
                fold::fold(&d, &base)?;
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
    let base_fd = crate::fsx::open_beneath(&rfd, base_rel.as_bytes(), crate::fsx::dir_flags())
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

/// The name of the layer store while `detach` moves the data back. Users
/// can create their own `.laybak` in the volume (it lives in a layer like
/// any file); then the store is first renamed out of its way, under a name
/// recorded in the state so a resumed detach finds it.
pub(super) fn detach_store_name(
    vol: &mut Volume,
    rfd: &rustix::fd::OwnedFd,
    base_seq: u64,
) -> Result<String> {
    if let Some(n) = vol.st.detach_store.clone() {
        if crate::fsx::stat_at(rfd, n.as_bytes())?.is_none() {
            // Recorded but not yet renamed (crash in between): nothing moved yet.
            crate::fsx::rename_at(rfd, STORE.as_bytes(), rfd, n.as_bytes())?;
        }
        return Ok(n);
    }
    let base_rel = format!("{STORE}/l/{base_seq}");
    let base_fd = crate::fsx::open_beneath(rfd, base_rel.as_bytes(), crate::fsx::dir_flags())?;
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

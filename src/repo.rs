//! The repository: config, packs of compressed blobs, indexes, layer
//! manifests and snapshot records, on top of a [`Backend`].
//!
//! Write order for a snapshot is packs → index → layer manifest → snapshot
//! record, each object written atomically, so a snapshot record never points
//! at data that is not durable. Every object but `config` is named by the
//! blake3 of its bytes, and every blob inside a pack is verified against its
//! own blake3 id when read.

use crate::backend::{Backend, LocalBackend};
use crate::format::{
    self, BlobId, FileId, FileKind, Id, IndexId, LayerId, LockId, PackId, RepoId, SnapshotId, Time,
};
use crate::layer::Layer;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::{Mutex, OnceLock};

/// Largest blob laybak writes or accepts (chunks are at most 4 MiB today).
pub const MAX_BLOB: u32 = 64 << 20;

/// Trailer magic at the very end of every pack.
pub const PACK_TAIL: &[u8; 8] = b"LBPKTAIL";

/// Repository parameters, fixed at `init`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    /// Repository id: blake3 of creation time, pid and host name.
    pub id: RepoId,
    /// When the repository was created.
    pub created: Time,
    /// FastCDC minimum chunk size.
    pub chunk_min: u32,
    /// FastCDC average chunk size.
    pub chunk_avg: u32,
    /// FastCDC maximum chunk size.
    pub chunk_max: u32,
    /// Target pack size in bytes.
    pub pack_size: u32,
    /// zstd level for blobs.
    pub zstd_level: i32,
}

/// Where a blob lives inside a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackBlob {
    /// blake3 of the uncompressed blob.
    pub id: BlobId,
    /// Offset of the stored bytes from the start of the pack file.
    pub offset: u64,
    /// Stored (possibly compressed) length.
    pub len: u32,
    /// Uncompressed length.
    pub raw_len: u32,
    /// Whether the stored bytes are a zstd frame.
    pub compressed: bool,
}

/// One pack as recorded in an index file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IndexPack {
    /// Pack id (blake3 of the pack file).
    pub id: PackId,
    /// Pack file size.
    pub size: u64,
    /// Its blobs.
    pub blobs: Vec<PackBlob>,
}

/// Figures recorded with each snapshot.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Entries in the new layer (including directories and whiteouts).
    pub entries: u64,
    /// Regular files in the new layer.
    pub files: u64,
    /// Whiteouts (deletions) in the new layer.
    pub whiteouts: u64,
    /// Apparent bytes of the files in the new layer.
    pub data_bytes: u64,
    /// Blobs this snapshot added to the repository.
    pub new_blobs: u64,
    /// Bytes this snapshot added to packs (after compression).
    pub new_bytes: u64,
}

/// One point in time of one volume.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// When the layer was sealed.
    pub time: Time,
    /// Volume name.
    pub volume: String,
    /// Host that took it.
    pub hostname: String,
    /// User tags.
    pub tags: Vec<String>,
    /// The previous snapshot of the volume.
    pub parent: Option<SnapshotId>,
    /// Layer manifest ids, bottom first.
    pub layers: Vec<LayerId>,
    /// Size figures.
    pub summary: Summary,
}

/// Readable snapshots (oldest first) and unreadable ones with the error.
pub type SnapshotList = (
    Vec<(SnapshotId, Snapshot)>,
    Vec<(SnapshotId, anyhow::Error)>,
);

/// Location of a blob.
#[derive(Clone, Copy, Debug)]
pub struct BlobLoc {
    /// Pack id.
    pub pack: PackId,
    /// Entry in the pack.
    pub blob: PackBlob,
}

/// An open repository.
pub struct Repo {
    /// Where it lives (for messages).
    pub location: PathBuf,
    backend: Arc<dyn Backend>,
    /// Parameters from `config`.
    pub config: Config,
    index: OnceLock<HashMap<BlobId, BlobLoc>>,
    added: Mutex<HashMap<BlobId, BlobLoc>>,
    packs: PackCache,
}

/// Whole packs recently read from a backend where every request costs a
/// round trip (S3): a restore reads blobs in pack order, so one GET per
/// pack replaces one per blob. A pack being fetched is waited for, not
/// fetched twice. At most [`PackCache::KEEP`] packs are held.
#[derive(Default)]
struct PackCache {
    recent: Mutex<std::collections::VecDeque<(PackId, PackSlot)>>,
}

/// A pack's bytes once fetched (`None`: it could not be read whole).
type PackSlot = Arc<OnceLock<Option<Arc<Vec<u8>>>>>;

impl PackCache {
    /// Packs held (16 MiB each by default: about 100 MiB at most).
    const KEEP: usize = 6;

    fn slot(&self, id: &PackId) -> PackSlot {
        let mut r = lock(&self.recent);
        if let Some(i) = r.iter().position(|(p, _)| p == id) {
            let e = r.remove(i).expect("position found");
            let slot = e.1.clone();
            r.push_back(e);
            return slot;
        }
        if r.len() >= Self::KEEP {
            r.pop_front();
        }
        let slot = Arc::new(OnceLock::new());
        r.push_back((*id, slot.clone()));
        slot
    }
}

/// The directory of each kind of file: with [`object_name`], the one place
/// object names are built.
fn dir_of(kind: FileKind) -> &'static str {
    match kind {
        FileKind::Config => "",
        FileKind::Pack => "packs",
        FileKind::Index => "index",
        FileKind::Layer => "layers",
        FileKind::Snapshot => "snapshots",
        FileKind::Plan => "plans",
        FileKind::Lock => "locks",
    }
}

/// The object name of file `id` of `kind` (packs are spread over 256
/// directories by their first byte).
pub fn object_name(kind: FileKind, id: &Id) -> String {
    let h = id.hex();
    match kind {
        FileKind::Config => "config".to_string(),
        FileKind::Pack => format!("packs/{}/{h}", &h[..2]),
        k => format!("{}/{h}", dir_of(k)),
    }
}

/// Object name of a stored file.
pub fn name_of<T: FileId>(id: &T) -> String {
    object_name(T::KIND, id.id())
}

/// Object name of a pack.
pub fn pack_name(id: &PackId) -> String {
    name_of(id)
}

/// One stored file, as listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Its id (for every kind but snapshots, the blake3 of its bytes).
    pub id: Id,
    /// Its size in bytes.
    pub size: u64,
}

/// The files of one kind, and names in their directory that are not
/// laybak's (reported by `check`, otherwise ignored).
#[derive(Debug, Default)]
pub struct Listing {
    /// Files named by an id.
    pub files: Vec<Stored>,
    /// Other names, relative to the directory.
    pub stray: Vec<String>,
}

/// A whole pack file as read: its bytes and whether they hash to its id.
pub struct PackData {
    /// The bytes.
    pub data: Vec<u8>,
    /// Whether blake3 of `data` is the pack's id (when not, single blobs
    /// inside may still verify: check and repair salvage them).
    pub intact: bool,
}

/// A file encoded once: its id is derived from these bytes when it is
/// made, and these bytes are what [`Repo::put`] writes under that id.
pub struct Sealed {
    kind: FileKind,
    /// blake3 of the bytes (a snapshot keeps this id when its record is
    /// rewritten later).
    pub id: Id,
    data: Vec<u8>,
}

impl Sealed {
    /// Seal `data` as a file of `kind`.
    pub fn new(kind: FileKind, data: Vec<u8>) -> Sealed {
        Sealed {
            kind,
            id: Id::of(&data),
            data,
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// The lock files of a repository, usable from a refresher thread.
#[derive(Clone)]
pub struct LockStore {
    backend: Arc<dyn Backend>,
}

impl LockStore {
    /// Ids of all lock files.
    ///
    /// # Errors
    /// Listing failed.
    pub fn ids(&self) -> Result<Vec<LockId>> {
        Ok(list_kind(self.backend.as_ref(), FileKind::Lock)?
            .files
            .into_iter()
            .map(|f| LockId(f.id))
            .collect())
    }

    /// A lock file's bytes, `None` when it is gone.
    ///
    /// # Errors
    /// It exists but cannot be read.
    pub fn read(&self, id: &LockId) -> Result<Option<Vec<u8>>> {
        match self.backend.get(&name_of(id)) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read lock {}", id.short())),
        }
    }

    /// Write (or refresh) a lock file.
    ///
    /// # Errors
    /// The write failed.
    pub fn write(&self, id: &LockId, data: &[u8]) -> Result<()> {
        Ok(self.backend.put_ephemeral(&name_of(id), data)?)
    }

    /// Remove a lock file (missing is fine).
    ///
    /// # Errors
    /// The removal failed.
    pub fn remove(&self, id: &LockId) -> Result<()> {
        Ok(self.backend.delete_ephemeral(&name_of(id))?)
    }
}

fn list_kind(backend: &dyn Backend, kind: FileKind) -> Result<Listing> {
    let mut out = Listing::default();
    for e in backend.list(dir_of(kind))? {
        // Packs live one directory deeper, in the one their id names.
        let id = match kind {
            FileKind::Pack => e
                .name
                .split_once('/')
                .and_then(|(d, n)| Id::parse(n).filter(|id| id.hex()[..2] == *d)),
            _ => Id::parse(&e.name),
        };
        match id {
            Some(id) => out.files.push(Stored { id, size: e.size }),
            None => out.stray.push(e.name),
        }
    }
    Ok(out)
}

/// How long one storage operation of a remote repository is retried
/// (`LAYBAK_RETRY_SECS`, default 60 s: longer than the half-minute a
/// Garage cluster can refuse every request after a node rejoins).
fn retry_budget() -> std::time::Duration {
    let secs = std::env::var("LAYBAK_RETRY_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(60);
    std::time::Duration::from_secs(secs)
}

/// The backend of a remote location (`s3://BUCKET/PREFIX`); `None` for a
/// local path. A new repository (`creating`) goes only into an empty
/// prefix.
fn remote(location: &Path, creating: bool) -> Result<Option<Arc<dyn Backend>>> {
    let Some(text) = location.to_str().filter(|t| t.starts_with("s3://")) else {
        return Ok(None);
    };
    let cfg = crate::backend::s3::S3Config::from_location(text)?;
    let s3 = crate::backend::s3::S3Backend::new(&cfg)?;
    if creating && !s3.exists("config")? && !s3.is_empty()? {
        bail!("{text} is not empty: give a new or empty prefix for the repository");
    }
    Ok(Some(Arc::new(crate::backend::retry::Retrying::new(
        s3,
        retry_budget(),
    ))))
}

fn no_repository(msg: String) -> anyhow::Error {
    crate::error::Error::new(crate::error::Kind::NoRepository, msg).into()
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

impl Repo {
    /// Create a new repository in `path` (missing or an empty directory).
    ///
    /// # Errors
    /// The path holds something already, or cannot be created.
    pub fn init(path: &Path) -> Result<Repo> {
        if let Some(be) = remote(path, true)? {
            return Repo::create(path, be);
        }
        if path.join("config").exists() {
            bail!(
                "{} is already a laybak repository: use it as it is",
                path.display()
            );
        }
        if path.exists() {
            if !path.is_dir() {
                bail!(
                    "{} exists and is not a directory: choose another path",
                    path.display()
                );
            }
            if std::fs::read_dir(path)?.next().is_some() {
                bail!(
                    "{} is not empty: give a new or empty directory for the repository",
                    path.display()
                );
            }
        } else {
            crate::backend::private_dirs(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
        }
        // Root's alone: the repository holds every user's data in the clear.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot make {} private", path.display()))?;
        }
        for d in ["packs", "index", "layers", "snapshots", "locks", "plans"] {
            crate::backend::private_dirs(&path.join(d))?;
        }
        crate::backend::sync_dir(path)?;
        Repo::create(path, Arc::new(LocalBackend::new(path)))
    }

    /// Create a repository on any backend that holds no `config` yet.
    /// `location` is only used in messages.
    ///
    /// # Errors
    /// A repository exists there already, or the config cannot be written.
    pub fn create(location: &Path, backend: Arc<dyn Backend>) -> Result<Repo> {
        if backend.exists("config")? {
            bail!(
                "{} is already a laybak repository: use it as it is",
                location.display()
            );
        }
        let seed = format!(
            "{:?}{}{}",
            Time::now(),
            rustix::process::getpid().as_raw_nonzero(),
            hostname()
        );
        let config = Config {
            id: RepoId(Id::of(seed.as_bytes())),
            created: Time::now(),
            chunk_min: 256 * 1024,
            chunk_avg: 1024 * 1024,
            chunk_max: 4 * 1024 * 1024,
            pack_size: 16 * 1024 * 1024,
            zstd_level: 3,
        };
        backend.put("config", &format::encode(FileKind::Config, &config)?)?;
        Ok(Repo {
            location: location.to_path_buf(),
            backend,
            config,
            index: OnceLock::new(),
            added: Mutex::new(HashMap::new()),
            packs: PackCache::default(),
        })
    }

    /// Open an existing repository.
    ///
    /// # Errors
    /// Missing, not a laybak repository, newer format, or unreadable.
    pub fn open(path: &Path) -> Result<Repo> {
        if let Some(be) = remote(path, false)? {
            return Repo::open_backend(path, be);
        }
        if !path.exists() {
            return Err(no_repository(format!(
                "no repository at {}: create one with `laybak init --repo {}`",
                path.display(),
                path.display()
            )));
        }
        let repo = Repo::open_backend(path, Arc::new(LocalBackend::new(path)))?;
        // Repositories made before 0.2 were world-readable: tighten those we
        // own (best effort: a read-only medium stays as it is).
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(path).is_ok_and(|m| m.uid() == rustix::process::geteuid().as_raw()) {
            let _ = crate::backend::make_private(path);
        }
        Ok(repo)
    }

    /// Open a repository through any backend (tests wrap the local one to
    /// inject faults). `location` is only used in messages.
    ///
    /// # Errors
    /// As [`Repo::open`].
    pub fn open_backend(path: &Path, backend: Arc<dyn Backend>) -> Result<Repo> {
        let data = match backend.get("config") {
            Ok(d) => d,
            Err(e) if e.is_not_found() => {
                return Err(no_repository(format!(
                    "{} is not a laybak repository (no config file): check --repo / LAYBAK_REPO",
                    path.display()
                )));
            }
            Err(e) => return Err(e).context(format!("cannot read {}/config", path.display())),
        };
        let config: Config = format::decode(FileKind::Config, &data)
            .with_context(|| format!("repository {}", path.display()))?;
        Ok(Repo {
            location: path.to_path_buf(),
            backend,
            config,
            index: OnceLock::new(),
            added: Mutex::new(HashMap::new()),
            packs: PackCache::default(),
        })
    }

    /// The repository's lock files.
    pub fn locks(&self) -> LockStore {
        LockStore {
            backend: self.backend.clone(),
        }
    }

    /// The files of one kind, with their sizes.
    ///
    /// # Errors
    /// Listing failed.
    pub fn list(&self, kind: FileKind) -> Result<Listing> {
        list_kind(self.backend.as_ref(), kind)
            .with_context(|| format!("cannot list {}", self.location.display()))
    }

    /// Whether file `id` of `kind` exists.
    ///
    /// # Errors
    /// It cannot be told (an unreachable repository is never "absent").
    pub fn contains<T: FileId>(&self, id: &T) -> Result<bool> {
        self.backend
            .exists(&name_of(id))
            .with_context(|| format!("cannot look up {} {}", T::KIND.name(), id.id().short()))
    }

    /// The ids and sizes of all files of one kind.
    ///
    /// # Errors
    /// Listing failed.
    pub fn ids<T: FileId>(&self) -> Result<Vec<(T, u64)>> {
        Ok(self
            .list(T::KIND)?
            .files
            .into_iter()
            .map(|f| (T::from_id(f.id), f.size))
            .collect())
    }

    /// Read a whole file and verify that its bytes hash to its id.
    ///
    /// # Errors
    /// Missing, unreadable, or corrupt.
    pub fn read_file<T: FileId>(&self, id: &T) -> Result<Vec<u8>> {
        let kind = T::KIND;
        let data = self
            .backend
            .get(&name_of(id))
            .with_context(|| format!("cannot read {} {}", kind.name(), id.id().short()))?;
        if Id::of(&data) != *id.id() {
            bail!(
                "{} {} is corrupt (blake3 mismatch): run `laybak check`",
                kind.name(),
                id.id().short()
            );
        }
        Ok(data)
    }

    /// Write a sealed file under its id.
    ///
    /// # Errors
    /// The write failed.
    pub fn put(&self, file: &Sealed) -> Result<()> {
        self.backend
            .put(&object_name(file.kind, &file.id), &file.data)
            .with_context(|| {
                format!(
                    "cannot write {} to {}",
                    file.kind.name(),
                    self.location.display()
                )
            })
    }

    /// Write a file named by the blake3 of `data`; returns that id.
    ///
    /// # Errors
    /// The write failed.
    pub fn write_file(&self, kind: FileKind, data: Vec<u8>) -> Result<Id> {
        let file = Sealed::new(kind, data);
        self.put(&file)?;
        Ok(file.id)
    }

    /// Delete a file (a missing one is fine).
    ///
    /// # Errors
    /// The deletion failed.
    pub fn delete_file<T: FileId>(&self, id: &T) -> Result<()> {
        self.backend
            .delete(&name_of(id))
            .with_context(|| format!("cannot delete {} {}", T::KIND.name(), id.id().short()))
    }

    /// Read a whole pack, saying whether it is intact.
    ///
    /// # Errors
    /// Missing or unreadable.
    pub fn read_pack(&self, id: &PackId) -> Result<PackData> {
        let data = self
            .backend
            .get(&pack_name(id))
            .with_context(|| format!("cannot read pack {}", id.short()))?;
        let intact = Id::of(&data) == id.0;
        Ok(PackData { data, intact })
    }

    /// All index files, merged: blob id → location.
    ///
    /// # Errors
    /// An index file is unreadable or corrupt.
    pub fn index(&self) -> Result<&HashMap<BlobId, BlobLoc>> {
        if let Some(i) = self.index.get() {
            return Ok(i);
        }
        let mut map = HashMap::new();
        for id in self.index_ids()? {
            for p in self.read_index(&id)? {
                for b in p.blobs {
                    map.insert(
                        b.id,
                        BlobLoc {
                            pack: p.id,
                            blob: b,
                        },
                    );
                }
            }
        }
        Ok(self.index.get_or_init(|| map))
    }

    /// Where a blob is: in the loaded index or written by this process.
    ///
    /// # Errors
    /// The index cannot be loaded.
    pub fn locate(&self, id: &BlobId) -> Result<Option<BlobLoc>> {
        if let Some(l) = self.index()?.get(id) {
            return Ok(Some(*l));
        }
        Ok(lock(&self.added).get(id).copied())
    }

    fn note_written(&self, packs: &[IndexPack]) {
        let mut added = lock(&self.added);
        for p in packs {
            for b in &p.blobs {
                added.insert(
                    b.id,
                    BlobLoc {
                        pack: p.id,
                        blob: *b,
                    },
                );
            }
        }
    }

    /// Ids of all index files.
    ///
    /// # Errors
    /// Listing failed.
    pub fn index_ids(&self) -> Result<Vec<IndexId>> {
        Ok(self.ids::<IndexId>()?.into_iter().map(|(i, _)| i).collect())
    }

    /// One index file.
    ///
    /// # Errors
    /// Unreadable or corrupt.
    pub fn read_index(&self, id: &IndexId) -> Result<Vec<IndexPack>> {
        let data = self.read_file(id)?;
        format::decode(FileKind::Index, &data).with_context(|| format!("index {}", id.short()))
    }

    /// Write an index file for `packs`.
    ///
    /// # Errors
    /// The write failed.
    pub fn write_index(&self, packs: &[IndexPack]) -> Result<IndexId> {
        let data = format::encode(FileKind::Index, &packs)?;
        Ok(IndexId(self.write_file(FileKind::Index, data)?))
    }

    /// Read and verify one blob.
    ///
    /// # Errors
    /// Unknown blob, unreadable pack, or content that does not hash to `id`.
    pub fn read_blob(&self, id: &BlobId) -> Result<Vec<u8>> {
        let loc = self.locate(id)?.ok_or_else(|| {
            anyhow!(
                "blob {} is missing from the index: run `laybak check`",
                id.short()
            )
        })?;
        if loc.blob.len > MAX_BLOB + 4096 {
            bail!(
                "the index says blob {} is {} bytes: run `laybak repair index`",
                id.short(),
                loc.blob.len
            );
        }
        let (start, len) = (loc.blob.offset, loc.blob.len as u64);
        if self.backend.round_trips() {
            let slot = self.packs.slot(&loc.pack);
            let whole =
                slot.get_or_init(|| self.backend.get(&pack_name(&loc.pack)).ok().map(Arc::new));
            if let Some(raw) = whole
                .as_ref()
                .and_then(|d| d.get(start as usize..(start + len) as usize))
            {
                return decode_blob(&loc.blob, raw.to_vec())
                    .with_context(|| format!("in pack {}", loc.pack.short()));
            }
            // Not readable whole: the ranged read below says why.
        }
        let raw = self
            .backend
            .get_range(&pack_name(&loc.pack), start, len)
            .with_context(|| format!("cannot read pack {}", loc.pack.short()))?;
        decode_blob(&loc.blob, raw).with_context(|| format!("in pack {}", loc.pack.short()))
    }

    /// Store a layer manifest (after validating it).
    ///
    /// # Errors
    /// Invalid layer or write failure.
    pub fn write_layer(&self, layer: &Layer) -> Result<LayerId> {
        layer.validate()?;
        let data = format::encode_layer(layer)?;
        Ok(LayerId(self.write_file(FileKind::Layer, data)?))
    }

    /// Load and validate a layer manifest.
    ///
    /// # Errors
    /// Missing, corrupt or structurally invalid.
    pub fn read_layer(&self, id: &LayerId) -> Result<Layer> {
        let data = self.read_file(id)?;
        format::decode_layer(&data).with_context(|| format!("layer {}", id.short()))
    }

    /// Encode a new snapshot record; its id comes from these bytes.
    ///
    /// # Errors
    /// Serialization failure.
    pub fn seal_snapshot(snap: &Snapshot) -> Result<Sealed> {
        Ok(Sealed::new(
            FileKind::Snapshot,
            format::encode_sealed(FileKind::Snapshot, snap)?,
        ))
    }

    /// Encode and store a new snapshot record; returns its id.
    ///
    /// # Errors
    /// Write failure.
    pub fn write_snapshot(&self, snap: &Snapshot) -> Result<SnapshotId> {
        let sealed = Repo::seal_snapshot(snap)?;
        self.put(&sealed)?;
        Ok(SnapshotId(sealed.id))
    }

    fn write_snapshot_data(&self, id: &SnapshotId, data: &[u8]) -> Result<()> {
        self.backend.put(&name_of(id), data).with_context(|| {
            format!(
                "cannot write snapshot record to {}",
                self.location.display()
            )
        })
    }

    /// Replace the record of an existing snapshot (same id), e.g. after its
    /// layers were squashed. Atomic: readers see the old or the new record.
    ///
    /// # Errors
    /// Write failure.
    pub fn rewrite_snapshot(&self, id: &SnapshotId, snap: &Snapshot) -> Result<()> {
        let data = format::encode_sealed(FileKind::Snapshot, snap)?;
        self.write_snapshot_data(id, &data)
    }

    /// Load one snapshot record, verifying its embedded blake3.
    ///
    /// # Errors
    /// Missing or corrupt.
    pub fn read_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        let data = self
            .backend
            .get(&name_of(id))
            .with_context(|| format!("cannot read snapshot {}", id.short()))?;
        format::decode_sealed(FileKind::Snapshot, &data)
            .with_context(|| format!("snapshot {}", id.short()))
    }

    /// All snapshots, oldest first.
    ///
    /// # Errors
    /// A record is unreadable or corrupt.
    pub fn snapshots(&self) -> Result<Vec<(SnapshotId, Snapshot)>> {
        let mut out = Vec::new();
        for id in self.snapshot_ids()? {
            out.push((id, self.read_snapshot(&id)?));
        }
        out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(out)
    }

    /// Resolve a full id, a unique prefix, or `latest` (of `volume` if given).
    ///
    /// # Errors
    /// Unknown or ambiguous.
    pub fn resolve(&self, spec: &str, volume: Option<&str>) -> Result<(SnapshotId, Snapshot)> {
        if spec == "latest" {
            // One damaged record must not make every other snapshot
            // unreachable: skip it, say so.
            let (all, bad) = self.snapshots_tolerant()?;
            for (id, e) in &bad {
                eprintln!(
                    "laybak: warning: snapshot {} is unreadable and was skipped ({e:#}); run `laybak check`",
                    id.short()
                );
            }
            let vols: HashSet<&str> = all.iter().map(|s| s.1.volume.as_str()).collect();
            if volume.is_none() && vols.len() > 1 {
                let mut v: Vec<_> = vols.into_iter().collect();
                v.sort();
                bail!(
                    "`latest` is ambiguous: the repository holds volumes {}; add --volume NAME",
                    v.join(", ")
                );
            }
            return all
                .into_iter()
                .rev()
                .find(|s| volume.is_none_or(|v| s.1.volume == v))
                .ok_or_else(|| match volume {
                    Some(v) => anyhow!("no snapshot of volume {v:?} in the repository"),
                    None => anyhow!("the repository has no snapshots yet"),
                });
        }
        let spec_l = spec.to_ascii_lowercase();
        if spec_l.is_empty() || !spec_l.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "{spec:?} is not a snapshot id: give an id or prefix from `laybak snapshots`, or `latest`"
            );
        }
        let m: Vec<SnapshotId> = self
            .snapshot_ids()?
            .into_iter()
            .filter(|id| id.hex().starts_with(&spec_l))
            .collect();
        match m.as_slice() {
            [] => bail!("no snapshot matches {spec:?}: list them with `laybak snapshots`"),
            [one] => Ok((*one, self.read_snapshot(one)?)),
            _ => bail!(
                "snapshot id {spec:?} is ambiguous ({} matches): give more characters",
                m.len()
            ),
        }
    }

    /// Ids of all snapshot records (names only; nothing is read).
    ///
    /// # Errors
    /// Listing failed.
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        Ok(self
            .ids::<SnapshotId>()?
            .into_iter()
            .map(|(i, _)| i)
            .collect())
    }

    /// All readable snapshots oldest first, and the ids that could not be
    /// read with why.
    ///
    /// # Errors
    /// Listing failed.
    pub fn snapshots_tolerant(&self) -> Result<SnapshotList> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for id in self.snapshot_ids()? {
            match self.read_snapshot(&id) {
                Ok(s) => ok.push((id, s)),
                Err(e) => bad.push((id, e)),
            }
        }
        ok.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok((ok, bad))
    }

    /// Load the manifests of a snapshot, bottom first.
    ///
    /// # Errors
    /// A manifest is missing or corrupt.
    pub fn layers_of(&self, snap: &Snapshot) -> Result<Vec<Layer>> {
        snap.layers.iter().map(|l| self.read_layer(l)).collect()
    }

    /// Host name recorded in new snapshots.
    pub fn hostname() -> String {
        hostname()
    }
}

/// Decompress and verify a blob read from a pack.
///
/// # Errors
/// Corrupt data or a hash mismatch.
pub fn decode_blob(b: &PackBlob, raw: Vec<u8>) -> Result<Vec<u8>> {
    // Bound what a crafted table can make us allocate (found by fuzzing).
    if b.raw_len > MAX_BLOB {
        bail!(
            "blob {} claims {} bytes, more than laybak ever writes ({MAX_BLOB})",
            b.id.short(),
            b.raw_len
        );
    }
    let data = if b.compressed {
        format::decompress_bounded(&raw, b.raw_len as u64)
            .map_err(|e| anyhow!("blob {} is corrupt ({e:#})", b.id.short()))?
    } else {
        raw
    };
    if data.len() != b.raw_len as usize || Id::of(&data) != b.id.0 {
        bail!("blob {} is corrupt (blake3 mismatch)", b.id.short());
    }
    Ok(data)
}

/// Parse the blob table at the end of a pack file.
///
/// # Errors
/// Not a pack, truncated, or an inconsistent table.
pub fn parse_pack_tail(data: &[u8]) -> Result<Vec<PackBlob>> {
    format::check_header(FileKind::Pack, data)?;
    let n = data.len();
    if n < 8 + 12 || &data[n - 8..] != PACK_TAIL {
        bail!("pack is truncated (no trailer)");
    }
    let tl = u32::from_le_bytes(data[n - 12..n - 8].try_into().expect("4 bytes")) as usize;
    if tl > n - 20 {
        bail!("pack trailer length {tl} is out of range");
    }
    let table = &data[n - 12 - tl..n - 12];
    let (blobs, rest): (Vec<PackBlob>, _) =
        postcard::take_from_bytes(table).map_err(|e| anyhow!("pack trailer is corrupt: {e}"))?;
    if !rest.is_empty() {
        bail!("pack trailer is corrupt: {} trailing bytes", rest.len());
    }
    let limit = (n - 12 - tl) as u64;
    for b in &blobs {
        if b.offset < 8
            || b.offset
                .checked_add(b.len as u64)
                .is_none_or(|end| end > limit)
        {
            bail!("pack trailer points outside the pack");
        }
    }
    Ok(blobs)
}

struct PackBuf {
    data: Vec<u8>,
    blobs: Vec<PackBlob>,
}

impl PackBuf {
    fn new() -> PackBuf {
        PackBuf {
            data: format::header(FileKind::Pack).to_vec(),
            blobs: Vec::new(),
        }
    }
}

/// A finished pack: its bytes, and the id and index entry derived from
/// them once, when it was sealed.
pub struct SealedPack {
    /// The pack file.
    pub file: Sealed,
    /// Its index entry.
    pub index: IndexPack,
}

/// Finish a pack: append the blob table, its length and the tail magic.
/// `None` for an empty pack.
fn seal(mut p: PackBuf) -> Option<SealedPack> {
    if p.blobs.is_empty() {
        return None;
    }
    let table = postcard::to_stdvec(&p.blobs).expect("serializing a Vec of plain structs");
    p.data.extend_from_slice(&table);
    p.data
        .extend_from_slice(&(table.len() as u32).to_le_bytes());
    p.data.extend_from_slice(PACK_TAIL);
    let file = Sealed::new(FileKind::Pack, p.data);
    let index = IndexPack {
        id: PackId(file.id),
        size: file.len(),
        blobs: p.blobs,
    };
    Some(SealedPack { file, index })
}

/// Builds packs from already stored (compressed) blobs, for repacking.
pub struct PackAssembler {
    target: usize,
    cur: PackBuf,
}

impl PackAssembler {
    /// Packs of about `target` bytes.
    pub fn new(target: usize) -> PackAssembler {
        PackAssembler {
            target,
            cur: PackBuf::new(),
        }
    }

    /// Add a blob's stored bytes; returns a finished pack when one fills.
    pub fn add_stored(&mut self, b: &PackBlob, raw: &[u8]) -> Option<SealedPack> {
        let offset = self.cur.data.len() as u64;
        self.cur.data.extend_from_slice(raw);
        self.cur.blobs.push(PackBlob { offset, ..*b });
        if self.cur.data.len() >= self.target {
            seal(std::mem::replace(&mut self.cur, PackBuf::new()))
        } else {
            None
        }
    }

    /// The last, partly filled pack.
    pub fn finish(self) -> Option<SealedPack> {
        seal(self.cur)
    }
}

/// Collects new blobs into packs. Safe to share across scanner threads:
/// compression runs on the caller's thread, pack files are written outside
/// the lock.
pub struct Packer<'r> {
    repo: &'r Repo,
    /// Where the blob cache lives; opened on first use, so a snapshot
    /// without new data never touches it.
    cache_dir: Option<PathBuf>,
    cache: OnceLock<Option<crate::blobcache::BlobCache>>,
    seen: Mutex<HashSet<BlobId>>,
    cur: Mutex<PackBuf>,
    done: Mutex<Vec<IndexPack>>,
    stats: Mutex<(u64, u64)>,
}

impl<'r> Packer<'r> {
    /// A packer writing to `repo`.
    pub fn new(repo: &'r Repo) -> Packer<'r> {
        Packer {
            repo,
            cache_dir: None,
            cache: OnceLock::new(),
            seen: Mutex::new(HashSet::new()),
            cur: Mutex::new(PackBuf::new()),
            done: Mutex::new(Vec::new()),
            stats: Mutex::new((0, 0)),
        }
    }

    /// A packer that asks a local [`BlobCache`](crate::blobcache::BlobCache)
    /// which blobs the repository has, instead of loading its index.
    /// The cache lives under `state_dir`; if it cannot be opened the
    /// packer falls back to the full index.
    pub fn with_cache(repo: &'r Repo, state_dir: &Path) -> Packer<'r> {
        Packer {
            cache_dir: Some(state_dir.to_path_buf()),
            ..Packer::new(repo)
        }
    }

    /// Store `data` under `id` (its blake3) unless the repository or this
    /// run already has it.
    ///
    /// # Errors
    /// Index loading or pack writing failed.
    pub fn add(&self, id: BlobId, data: &[u8]) -> Result<()> {
        let cache = self.cache.get_or_init(|| {
            self.cache_dir
                .as_ref()
                .and_then(|d| crate::blobcache::BlobCache::open(d, self.repo).ok())
        });
        let present = match cache {
            Some(c) => c.contains(&id)? || lock(&self.repo.added).contains_key(&id),
            None => self.repo.locate(&id)?.is_some(),
        };
        if present {
            return Ok(());
        }
        if !lock(&self.seen).insert(id) {
            return Ok(());
        }
        let z = zstd::bulk::compress(data, self.repo.config.zstd_level)?;
        let (stored, compressed) = if z.len() < data.len() {
            (&z[..], true)
        } else {
            (data, false)
        };
        let full = {
            let mut cur = lock(&self.cur);
            let offset = cur.data.len() as u64;
            cur.data.extend_from_slice(stored);
            cur.blobs.push(PackBlob {
                id,
                offset,
                len: stored.len() as u32,
                raw_len: data.len() as u32,
                compressed,
            });
            if cur.data.len() >= self.repo.config.pack_size as usize {
                Some(std::mem::replace(&mut *cur, PackBuf::new()))
            } else {
                None
            }
        };
        {
            let mut s = lock(&self.stats);
            s.0 += 1;
            s.1 += stored.len() as u64;
        }
        if let Some(p) = full {
            self.write_pack(p)?;
        }
        Ok(())
    }

    fn write_pack(&self, p: PackBuf) -> Result<()> {
        let Some(pack) = seal(p) else {
            return Ok(());
        };
        crate::failpoint::hit("pack-write")?;
        self.repo
            .put(&pack.file)
            .with_context(|| format!("cannot write a pack to {}", self.repo.location.display()))?;
        lock(&self.done).push(pack.index);
        Ok(())
    }

    /// Flush the last pack and write the index for everything this packer
    /// stored.
    ///
    /// # Errors
    /// Pack or index write failed.
    pub fn finish(self) -> Result<Added> {
        let last = std::mem::replace(&mut *lock(&self.cur), PackBuf::new());
        self.write_pack(last)?;
        let done = std::mem::take(&mut *lock(&self.done));
        if !done.is_empty() {
            crate::failpoint::hit("index-write")?;
            self.repo.write_index(&done)?;
            self.repo.note_written(&done);
        }
        let (blobs, bytes) = *lock(&self.stats);
        Ok(Added { blobs, bytes })
    }
}

/// What a [`Packer`] added to the repository.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Added {
    /// New blobs.
    pub blobs: u64,
    /// Their stored (compressed) bytes.
    pub bytes: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trip_and_corruption() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::init(&d.path().join("r")).unwrap();
        let p = Packer::new(&repo);
        let a = vec![7u8; 100_000];
        let b: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
        p.add(BlobId(Id::of(&a)), &a).unwrap();
        p.add(BlobId(Id::of(&b)), &b).unwrap();
        p.add(BlobId(Id::of(&a)), &a).unwrap();
        assert_eq!(p.finish().unwrap().blobs, 2);
        let repo = Repo::open(&d.path().join("r")).unwrap();
        assert_eq!(repo.read_blob(&BlobId(Id::of(&a))).unwrap(), a);
        assert_eq!(repo.read_blob(&BlobId(Id::of(&b))).unwrap(), b);
        let packs = repo.list(FileKind::Pack).unwrap().files;
        assert_eq!(packs.len(), 1);
        let path = d
            .path()
            .join("r")
            .join(object_name(FileKind::Pack, &packs[0].id));
        let data = std::fs::read(&path).unwrap();
        assert_eq!(parse_pack_tail(&data).unwrap().len(), 2);
        let mut bad = data.clone();
        let loc = repo.index().unwrap()[&BlobId(Id::of(&b))];
        bad[loc.blob.offset as usize + 3] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let repo = Repo::open(&d.path().join("r")).unwrap();
        assert!(repo.read_blob(&BlobId(Id::of(&b))).is_err());
        assert!(parse_pack_tail(&data[..data.len() - 1]).is_err());
    }

    #[test]
    fn backend_faults_give_errors_never_wrong_data() {
        use crate::backend::testing::{Fault, Faulty};
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r");
        Repo::init(&path).unwrap();
        let faulty = Arc::new(Faulty::new(LocalBackend::new(&path)));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let id = BlobId(Id::of(&data));
        // A failing write leaves no pack and reports the error.
        let repo = Repo::open_backend(&path, faulty.clone()).unwrap();
        faulty.set(Fault::NoSpace);
        let p = Packer::new(&repo);
        p.add(id, &data).unwrap();
        let e = p.finish().unwrap_err();
        assert!(format!("{e:#}").contains("No space left"), "{e:#}");
        faulty.set(Fault::None);
        assert!(repo.list(FileKind::Pack).unwrap().files.is_empty());
        let p = Packer::new(&repo);
        p.add(id, &data).unwrap();
        p.finish().unwrap();
        let repo = Repo::open_backend(&path, faulty.clone()).unwrap();
        for f in [Fault::ReadError, Fault::Short, Fault::Flip] {
            faulty.set(f);
            assert!(repo.read_blob(&id).is_err(), "{f:?} returned data");
        }
        faulty.set(Fault::None);
        assert_eq!(repo.read_blob(&id).unwrap(), data);
    }

    #[test]
    fn open_errors_are_clear() {
        let d = tempfile::tempdir().unwrap();
        let e = Repo::open(&d.path().join("nope")).err().unwrap();
        assert!(e.to_string().contains("laybak init"), "{e}");
        let e = Repo::open(d.path()).err().unwrap();
        assert!(e.to_string().contains("not a laybak repository"), "{e}");
        std::fs::write(d.path().join("x"), "").unwrap();
        assert!(Repo::init(d.path()).is_err());
    }
}

//! The repository: config, packs of compressed blobs, indexes, layer
//! manifests and snapshot records, on top of a [`Backend`].
//!
//! Write order for a snapshot is packs → index → layer manifest → snapshot
//! record, each object written atomically, so a snapshot record never points
//! at data that is not durable. Every object but `config` is named by the
//! blake3 of its bytes, and every blob inside a pack is verified against its
//! own blake3 id when read.

use crate::backend::{Backend, LocalBackend};
use crate::crypt::{self, Crypt, KeyFile, Keys};
use crate::format::{
    self, BlobId, FileId, FileKind, Id, IndexId, KeyId, LayerId, LockId, PackId, PlanId, RepoId,
    SnapshotId, Time,
};
use crate::layer::Layer;
use crate::password::{Password, Passwords};
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::borrow::Cow;
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
    crypt: Crypt,
    /// The key file that opened it (encrypted repositories).
    pub key: Option<KeyId>,
}

/// How a new repository protects what it stores.
#[derive(Clone)]
pub enum Protection {
    /// Plaintext (format versions 1 and 2): anyone who can read the
    /// repository can read every backed-up file.
    Plaintext,
    /// Encrypted (format version 3) with one first key.
    Encrypted {
        /// The first key's password.
        password: Password,
        /// Its Argon2id parameters.
        kdf: crypt::Kdf,
    },
}

impl Protection {
    /// Encrypted with `password` and [`crypt::TEST_KDF`] (tests only).
    pub fn test(password: &str) -> Protection {
        Protection::Encrypted {
            password: zeroize::Zeroizing::new(password.to_string()),
            kdf: crypt::TEST_KDF,
        }
    }
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
        FileKind::Key => "keys",
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
    crypt: Crypt,
}

impl LockStore {
    /// The id of a new lock taken by `who` (time, pid and host): keyed in
    /// an encrypted repository, so the name tells nothing about the host.
    pub fn new_id(&self, who: &str) -> LockId {
        match &self.crypt {
            Crypt::Plain => LockId(Id::of(who.as_bytes())),
            Crypt::Keyed(k) => LockId(k.name_of(b"lock", who.as_bytes())),
        }
    }

    /// Encode a lock file for lock `id`.
    ///
    /// # Errors
    /// Serialization failure.
    pub fn encode<T: Serialize>(&self, id: &LockId, value: &T) -> Result<Vec<u8>> {
        encode_meta(&self.crypt, FileKind::Lock, &id.0.0, value)
    }

    /// Decode lock file `id`.
    ///
    /// # Errors
    /// Corrupt, forged, or of a newer format.
    pub fn decode<T: DeserializeOwned>(&self, id: &LockId, data: &[u8]) -> Result<T> {
        decode_meta(&self.crypt, FileKind::Lock, &id.0.0, data)
    }

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

/// Encode a metadata file: versions 1/2 in a plaintext repository,
/// version 3 (sealed, bound to `bind`) in an encrypted one. Layers use
/// [`Repo::encode_layer`].
fn encode_meta<T: Serialize>(c: &Crypt, kind: FileKind, bind: &[u8], value: &T) -> Result<Vec<u8>> {
    match c {
        Crypt::Plain if kind == FileKind::Snapshot => format::encode_sealed(kind, value),
        Crypt::Plain => format::encode(kind, value),
        Crypt::Keyed(k) => crypt::encode(k, kind, bind, value),
    }
}

/// Decode what [`encode_meta`] wrote; an encrypted repository accepts
/// only version 3, a plaintext one only versions 1 and 2.
fn decode_meta<T: DeserializeOwned>(
    c: &Crypt,
    kind: FileKind,
    bind: &[u8],
    data: &[u8],
) -> Result<T> {
    match c {
        Crypt::Plain if kind == FileKind::Snapshot => format::decode_sealed(kind, data),
        Crypt::Plain => format::decode(kind, data),
        Crypt::Keyed(k) => crypt::decode(k, kind, bind, data),
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

/// The keys of an encrypted repository: the first key file that opens
/// with the password and belongs to this repository (its metadata and
/// `config` open with the master secret it wraps).
fn unlock(
    backend: &dyn Backend,
    location: &Path,
    config: &[u8],
    passwords: &dyn Passwords,
) -> Result<(Keys, KeyId)> {
    let files = list_kind(backend, FileKind::Key)
        .with_context(|| format!("cannot list the keys of {}", location.display()))?
        .files;
    if files.is_empty() {
        bail!(
            "{} is encrypted but has no key files (keys/ is empty): it cannot be opened; put back keys/ from a copy",
            location.display()
        );
    }
    let password = passwords.current(&location.display().to_string())?;
    let (mut tried, mut opened) = (0, 0);
    let mut damaged = Vec::new();
    for f in files {
        let id = KeyId(f.id);
        if f.size > crypt::MAX_KEY_FILE as u64 {
            damaged.push(format!("{} ({} bytes)", id.short(), f.size));
            continue;
        }
        let data = backend
            .get(&name_of(&id))
            .with_context(|| format!("cannot read key {}", id.short()))?;
        let kf = match KeyFile::decode(&data) {
            Ok(kf) if Id::of(&data) == f.id => kf,
            Ok(_) => {
                damaged.push(format!("{} (blake3 mismatch)", id.short()));
                continue;
            }
            Err(e) => {
                damaged.push(format!("{} ({e:#})", id.short()));
                continue;
            }
        };
        let master = match kf.unwrap(password.as_bytes()) {
            Ok(Some(m)) => m,
            Ok(None) => {
                tried += 1;
                continue;
            }
            Err(e) => {
                damaged.push(format!("{} ({e:#})", id.short()));
                continue;
            }
        };
        tried += 1;
        opened += 1;
        let keys = Keys::new(master);
        if crypt::decode::<Config>(&keys, FileKind::Config, b"", config).is_err() {
            // Another repository's key (or this config is damaged).
            continue;
        }
        return Ok((keys, id));
    }
    if opened > 0 {
        bail!(
            "{}: config is corrupt: it fails authentication with every key this password opens ({opened}), or those keys are another repository's; restore config from a copy",
            location.display()
        );
    }
    let note = if damaged.is_empty() {
        String::new()
    } else {
        format!(" (unusable key files: {})", damaged.join(", "))
    };
    if tried == 0 {
        bail!(
            "{} has no usable key file{note}: put back keys/ from a copy",
            location.display()
        );
    }
    Err(crate::error::Error::new(
        crate::error::Kind::Password,
        format!(
            "wrong password for {}: none of its {tried} keys opens with it; nothing was changed{note}",
            location.display()
        ),
    )
    .into())
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
    pub fn init(path: &Path, protection: &Protection) -> Result<Repo> {
        if let Some(be) = remote(path, true)? {
            return Repo::create(path, be, protection);
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
        // Root's alone: even encrypted, names and sizes are nobody else's.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot make {} private", path.display()))?;
        }
        for d in [
            "packs",
            "index",
            "layers",
            "snapshots",
            "locks",
            "plans",
            "keys",
        ] {
            crate::backend::private_dirs(&path.join(d))?;
        }
        crate::backend::sync_dir(path)?;
        Repo::create(path, Arc::new(LocalBackend::new(path)), protection)
    }

    /// Create a repository on any backend that holds no `config` yet.
    /// `location` is only used in messages. An encrypted one gets its key
    /// file first and `config` last, so a crash leaves no repository
    /// without a key.
    ///
    /// # Errors
    /// A repository exists there already, or the config cannot be written.
    pub fn create(
        location: &Path,
        backend: Arc<dyn Backend>,
        protection: &Protection,
    ) -> Result<Repo> {
        if backend.exists("config")? {
            bail!(
                "{} is already a laybak repository: use it as it is",
                location.display()
            );
        }
        let mut config = Config {
            id: RepoId(Id([0; 32])),
            created: Time::now(),
            chunk_min: 256 * 1024,
            chunk_avg: 1024 * 1024,
            chunk_max: 4 * 1024 * 1024,
            pack_size: 16 * 1024 * 1024,
            zstd_level: 3,
        };
        let (crypt, key) = match protection {
            Protection::Plaintext => {
                let seed = format!(
                    "{:?}{}{}",
                    Time::now(),
                    rustix::process::getpid().as_raw_nonzero(),
                    hostname()
                );
                config.id = RepoId(Id::of(seed.as_bytes()));
                (Crypt::Plain, None)
            }
            Protection::Encrypted { password, kdf } => {
                crypt::random(&mut config.id.0.0)?;
                let keys = Keys::new(crypt::Master::generate()?);
                let kf = KeyFile::wrap(&keys, password.as_bytes(), *kdf, hostname())?;
                let file = Sealed::new(FileKind::Key, kf.encode()?);
                backend
                    .put(&object_name(FileKind::Key, &file.id), &file.data)
                    .with_context(|| {
                        format!("cannot write a key file to {}", location.display())
                    })?;
                (Crypt::Keyed(Arc::new(keys)), Some(KeyId(file.id)))
            }
        };
        backend.put(
            "config",
            &encode_meta(&crypt, FileKind::Config, b"", &config)?,
        )?;
        Ok(Repo {
            location: location.to_path_buf(),
            backend,
            config,
            index: OnceLock::new(),
            added: Mutex::new(HashMap::new()),
            packs: PackCache::default(),
            crypt,
            key,
        })
    }

    /// Open an existing repository; `passwords` is asked only when it is
    /// encrypted.
    ///
    /// # Errors
    /// Missing, not a laybak repository, newer format, wrong password, or
    /// unreadable.
    pub fn open(path: &Path, passwords: &dyn Passwords) -> Result<Repo> {
        if let Some(be) = remote(path, false)? {
            return Repo::open_backend(path, be, passwords);
        }
        if !path.exists() {
            return Err(no_repository(format!(
                "no repository at {}: create one with `laybak init --repo {}`",
                path.display(),
                path.display()
            )));
        }
        let repo = Repo::open_backend(path, Arc::new(LocalBackend::new(path)), passwords)?;
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
    pub fn open_backend(
        path: &Path,
        backend: Arc<dyn Backend>,
        passwords: &dyn Passwords,
    ) -> Result<Repo> {
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
        // The header says whether it is encrypted before anything is
        // decrypted (and a newer format is refused before a password is
        // asked for).
        format::check_header(FileKind::Config, &data)
            .with_context(|| format!("repository {}", path.display()))?;
        let (crypt, key) = if data[7] == crypt::ENCRYPTED {
            let (keys, key) = unlock(backend.as_ref(), path, &data, passwords)?;
            (Crypt::Keyed(Arc::new(keys)), Some(key))
        } else {
            // Key files beside a plaintext config: someone replaced the
            // config to make us write in the clear.
            if !list_kind(backend.as_ref(), FileKind::Key)?.files.is_empty() {
                bail!(
                    "{} has key files but a plaintext config: the config was replaced or damaged; refusing to use it (restore config from a copy)",
                    path.display()
                );
            }
            (Crypt::Plain, None)
        };
        let config: Config = decode_meta(&crypt, FileKind::Config, b"", &data)
            .with_context(|| format!("repository {}", path.display()))?;
        Ok(Repo {
            location: path.to_path_buf(),
            backend,
            config,
            index: OnceLock::new(),
            added: Mutex::new(HashMap::new()),
            packs: PackCache::default(),
            crypt,
            key,
        })
    }

    /// How it stores bytes.
    pub fn crypt(&self) -> &Crypt {
        &self.crypt
    }

    /// Whether the repository is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.crypt.is_encrypted()
    }

    /// Id of a blob's plaintext (keyed in an encrypted repository).
    pub fn blob_id(&self, data: &[u8]) -> BlobId {
        self.crypt.blob_id(data)
    }

    /// The FastCDC seed (0 in a plaintext repository).
    pub fn chunker_seed(&self) -> u64 {
        self.crypt.chunker_seed()
    }

    /// The key files, with their ids and what they say about
    /// themselves (which proves they are this repository's).
    ///
    /// # Errors
    /// A plaintext repository, listing or reading failed, or a key file is
    /// damaged or another repository's.
    pub fn key_files(&self) -> Result<Vec<(KeyId, KeyFile, crypt::KeyMeta)>> {
        let Some(keys) = self.crypt.keys() else {
            bail!(
                "{} is not encrypted: it has no keys",
                self.location.display()
            );
        };
        let mut out = Vec::new();
        for (id, size) in self.ids::<KeyId>()? {
            if size > crypt::MAX_KEY_FILE as u64 {
                bail!("key {} is corrupt ({size} bytes)", id.short());
            }
            let data = self.read_file(&id)?;
            let kf = KeyFile::decode(&data).with_context(|| format!("key {}", id.short()))?;
            let meta = kf
                .meta(keys)
                .with_context(|| format!("key {}", id.short()))?;
            out.push((id, kf, meta));
        }
        Ok(out)
    }

    /// A fresh handle on the same repository with the same keys: config
    /// read again, nothing of the index remembered (a prune may have run
    /// since), no key derivation.
    ///
    /// # Errors
    /// The config cannot be read, or no longer opens with these keys.
    pub fn reopen(&self) -> Result<Repo> {
        let data = self
            .backend
            .get("config")
            .with_context(|| format!("cannot read {}/config", self.location.display()))?;
        let config: Config = decode_meta(&self.crypt, FileKind::Config, b"", &data)
            .with_context(|| format!("repository {}", self.location.display()))?;
        Ok(Repo {
            location: self.location.clone(),
            backend: self.backend.clone(),
            config,
            index: OnceLock::new(),
            added: Mutex::new(HashMap::new()),
            packs: PackCache::default(),
            crypt: self.crypt.clone(),
            key: self.key,
        })
    }

    /// Add a key file wrapping this repository's master secret under
    /// `password`.
    ///
    /// # Errors
    /// A plaintext repository, or the write failed.
    pub fn add_key(&self, password: &[u8], kdf: crypt::Kdf) -> Result<KeyId> {
        let Some(keys) = self.crypt.keys() else {
            bail!(
                "{} is not encrypted: it has no keys (a plaintext repository stays plaintext; make an encrypted one with `laybak init`)",
                self.location.display()
            );
        };
        let kf = KeyFile::wrap(keys, password, kdf, hostname())?;
        Ok(KeyId(self.write_file(FileKind::Key, kf.encode()?)?))
    }

    /// Remove key file `id`. The last key and the key this handle was
    /// opened with are refused.
    ///
    /// # Errors
    /// Refused, unknown, or the removal failed.
    pub fn remove_key(&self, id: &KeyId) -> Result<()> {
        let ids: Vec<KeyId> = self.ids::<KeyId>()?.into_iter().map(|(k, _)| k).collect();
        if !ids.contains(id) {
            bail!(
                "no key {} in {}: see `laybak key list`",
                id.short(),
                self.location.display()
            );
        }
        if ids.len() == 1 {
            bail!(
                "key {} is the repository's last key: removing it would lose all data; add another first",
                id.short()
            );
        }
        if self.key == Some(*id) {
            bail!(
                "key {} is the one this password opened: open with another key to remove it, or use `laybak key passwd`",
                id.short()
            );
        }
        self.delete_file(id)
    }

    /// The repository's lock files.
    pub fn locks(&self) -> LockStore {
        LockStore {
            backend: self.backend.clone(),
            crypt: self.crypt.clone(),
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

    /// Remember where blobs just listed in an index file are, for
    /// [`Repo::locate`] — only when the index is loaded already: one loaded
    /// later reads that index file from the repository, and an import of
    /// millions of blobs with the blob cache never loads it (so this
    /// table, the largest per blob, is not built for it).
    fn note_written(&self, packs: &[IndexPack]) {
        if self.index.get().is_none() {
            return;
        }
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
        decode_meta(&self.crypt, FileKind::Index, b"", &data)
            .with_context(|| format!("index {}", id.short()))
    }

    /// Encode an index file (to write later with [`Repo::put`]).
    ///
    /// # Errors
    /// Serialization failure.
    pub fn seal_index(&self, packs: &[IndexPack]) -> Result<Sealed> {
        Ok(Sealed::new(
            FileKind::Index,
            encode_meta(&self.crypt, FileKind::Index, b"", &packs)?,
        ))
    }

    /// A forget plan.
    ///
    /// # Errors
    /// Unreadable, corrupt or forged.
    pub fn read_plan(&self, id: &PlanId) -> Result<crate::reclaim::Plan> {
        let data = self.read_file(id)?;
        decode_meta(&self.crypt, FileKind::Plan, b"", &data)
    }

    /// Store a forget plan; returns its id.
    ///
    /// # Errors
    /// Write failure.
    pub fn write_plan(&self, plan: &crate::reclaim::Plan) -> Result<PlanId> {
        let data = encode_meta(&self.crypt, FileKind::Plan, b"", plan)?;
        Ok(PlanId(self.write_file(FileKind::Plan, data)?))
    }

    /// Write an index file for `packs`.
    ///
    /// # Errors
    /// The write failed.
    pub fn write_index(&self, packs: &[IndexPack]) -> Result<IndexId> {
        let file = self.seal_index(packs)?;
        self.put(&file)?;
        Ok(IndexId(file.id))
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
            if let Some(raw) = whole.as_ref().and_then(|d| {
                let end = start.checked_add(len)?;
                d.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
            }) {
                return self
                    .decode_blob(&loc.blob, raw.to_vec())
                    .with_context(|| format!("in pack {}", loc.pack.short()));
            }
            // Not readable whole: the ranged read below says why.
        }
        let raw = self
            .backend
            .get_range(&pack_name(&loc.pack), start, len)
            .with_context(|| format!("cannot read pack {}", loc.pack.short()))?;
        self.decode_blob(&loc.blob, raw)
            .with_context(|| format!("in pack {}", loc.pack.short()))
    }

    /// Store a layer manifest (after validating it): its pages, if it
    /// needs them, in a pack of their own, then its file.
    ///
    /// # Errors
    /// Invalid layer or write failure.
    pub fn write_layer(&self, layer: &Layer) -> Result<LayerId> {
        let packer = Packer::new(self);
        let file = self.stage_layer(layer, &packer)?;
        packer.finish()?;
        self.put_layer(file)
    }

    /// Validate `layer`, hand its pages (if it is too large for one file)
    /// to `packer` one at a time, and return the bytes of its file, to be
    /// stored with [`Repo::put_layer`] once `packer` has finished: the file
    /// never names a page that is not stored.
    ///
    /// # Errors
    /// Invalid layer or write failure.
    pub fn stage_layer(&self, layer: &Layer, packer: &Packer<'_>) -> Result<Vec<u8>> {
        self.stage_entries(&|| Ok(borrowed(layer)), packer)
    }

    /// As [`Repo::stage_layer`], for a layer given as its entries in
    /// order, checked as they pass: `open` yields them from the start
    /// (it is called a second time only for a layer holding an entry too
    /// large for a page). Only the page being cut is held in memory.
    ///
    /// # Errors
    /// An invalid entry, an error of `open`, or a write failure.
    pub fn stage_entries<'e>(
        &self,
        open: &dyn Fn() -> Result<Entries<'e>>,
        packer: &Packer<'_>,
    ) -> Result<Vec<u8>> {
        self.layer_file(open, true, page_entries(), &mut |id, bytes| {
            packer.add(id, &bytes)
        })
    }

    /// Store the file [`Repo::stage_layer`] made.
    ///
    /// # Errors
    /// Write failure.
    pub fn put_layer(&self, file: Vec<u8>) -> Result<LayerId> {
        Ok(LayerId(self.write_file(FileKind::Layer, file)?))
    }

    /// The bytes of a layer manifest's file (its id is their blake3): the
    /// oldest version that can hold it in a plaintext repository, version
    /// 3 in an encrypted one, and version 4 (the list of its pages) for a
    /// layer of more than one page.
    ///
    /// # Errors
    /// Serialization failure.
    pub fn encode_layer(&self, layer: &Layer) -> Result<Vec<u8>> {
        self.layer_file(
            &|| Ok(borrowed(layer)),
            false,
            page_entries(),
            &mut |_, _| Ok(()),
        )
    }

    /// The blobs that would hold `layer`'s pages (none when it fits one
    /// file).
    ///
    /// # Errors
    /// Serialization failure.
    pub fn page_blobs(&self, layer: &Layer) -> Result<Vec<BlobId>> {
        let mut ids = Vec::new();
        self.layer_file(
            &|| Ok(borrowed(layer)),
            false,
            page_entries(),
            &mut |id, _| {
                ids.push(id);
                Ok(())
            },
        )?;
        Ok(ids)
    }

    /// A layer's file from its entries, each checked as it passes when
    /// `checked`: one file when they fit one page, else each page goes to
    /// `page` as it is cut (at `max_entries` entries, or once its encoding
    /// reaches [`PAGE_BYTES`](crate::layer::PAGE_BYTES)) and the file
    /// lists them.
    fn layer_file<'e>(
        &self,
        open: &dyn Fn() -> Result<Entries<'e>>,
        checked: bool,
        max_entries: usize,
        page: &mut dyn FnMut(BlobId, Vec<u8>) -> Result<()>,
    ) -> Result<Vec<u8>> {
        let max_entries = max_entries.max(1);
        let mut entries = open()?.peekable();
        let mut check = crate::layer::Checker::default();
        // The first page's entries, kept until a second page begins: a
        // layer of one page is one file.
        let mut first_page: Option<Vec<crate::layer::Entry>> = Some(Vec::new());
        let mut list = crate::layer::Pages {
            entries: 0,
            pages: Vec::new(),
        };
        let mut body = Vec::new();
        let mut n = 0usize;
        let mut first_path = Vec::new();
        while let Some(e) = entries.next() {
            let e = e?;
            if checked {
                check.check(&e)?;
            }
            if n == 0 {
                first_path.clone_from(&e.path);
            }
            body = postcard::to_extend(&*e, body).context("serializing a layer manifest")?;
            n += 1;
            if let Some(f) = &mut first_page {
                f.push(e.into_owned());
            }
            if n < max_entries && body.len() < crate::layer::PAGE_BYTES {
                continue;
            }
            if first_page.is_some() {
                if entries.peek().is_none() {
                    break;
                }
                first_page = None;
            }
            if !self.add_page(&mut list, n, &mut body, &mut first_path, page)? {
                return self.whole_layer_file_of(open, checked);
            }
            n = 0;
        }
        if checked {
            check.finish()?;
        }
        if let Some(entries) = first_page {
            return self.whole_layer_file(&Layer { entries });
        }
        if n > 0 && !self.add_page(&mut list, n, &mut body, &mut first_path, page)? {
            return self.whole_layer_file_of(open, checked);
        }
        self.pages_file(&list)
    }

    /// Cut a page of `n` entries encoded in `body`, first path `first`:
    /// hand it to `page` and list it. `false` when it is too large for a
    /// blob (an entry of more than 60 MiB: a file of millions of chunks or
    /// extents), and the layer must be one file.
    fn add_page(
        &self,
        list: &mut crate::layer::Pages,
        n: usize,
        body: &mut Vec<u8>,
        first: &mut Vec<u8>,
        page: &mut dyn FnMut(BlobId, Vec<u8>) -> Result<()>,
    ) -> Result<bool> {
        // postcard(Vec<Entry>) is varint(len) followed by the entries.
        let mut bytes = postcard::to_stdvec(&(n as u64)).context("serializing a page")?;
        bytes.append(body);
        if bytes.len() > MAX_BLOB as usize {
            return Ok(false);
        }
        let blob = self.blob_id(&bytes);
        list.entries += n as u64;
        list.pages.push(crate::layer::PageRef {
            blob,
            entries: n as u32,
            first: std::mem::take(first),
        });
        page(blob, bytes)?;
        Ok(true)
    }

    /// A layer with an entry too large for a page, in one file, as before
    /// pages existed (bounded at 1 GiB). Pages already handed over are
    /// unreferenced; prune removes them.
    fn whole_layer_file_of<'e>(
        &self,
        open: &dyn Fn() -> Result<Entries<'e>>,
        checked: bool,
    ) -> Result<Vec<u8>> {
        let entries = open()?
            .map(|e| e.map(Cow::into_owned))
            .collect::<Result<Vec<_>>>()?;
        let layer = Layer { entries };
        if checked {
            layer.validate()?;
        }
        self.whole_layer_file(&layer)
    }

    /// A layer manifest in one file (version 1/2, or 3 when encrypted).
    fn whole_layer_file(&self, layer: &Layer) -> Result<Vec<u8>> {
        match &self.crypt {
            Crypt::Plain => format::encode_layer(layer),
            Crypt::Keyed(k) => crypt::encode(k, FileKind::Layer, b"", layer),
        }
    }

    /// The file of a paged layer manifest: its list of pages (version 4).
    fn pages_file(&self, list: &crate::layer::Pages) -> Result<Vec<u8>> {
        match &self.crypt {
            Crypt::Plain => format::encode_pages(list),
            Crypt::Keyed(k) => crypt::encode_v(k, FileKind::Layer, format::LAYER_PAGES, b"", list),
        }
    }

    /// Load and validate a layer manifest.
    ///
    /// # Errors
    /// Missing, corrupt or structurally invalid, or a page missing.
    pub fn read_layer(&self, id: &LayerId) -> Result<Layer> {
        self.read_layer_parts(id).map(|(l, _)| l)
    }

    /// Load and validate a layer manifest, and say which blobs hold its
    /// pages (none for a layer in one file): prune keeps them.
    ///
    /// # Errors
    /// As [`Repo::read_layer`].
    pub fn read_layer_parts(&self, id: &LayerId) -> Result<(Layer, Vec<BlobId>)> {
        let data = self.read_file(id)?;
        self.decode_layer_file(&data)
            .with_context(|| format!("layer {}", id.short()))
    }

    fn decode_layer_file(&self, data: &[u8]) -> Result<(Layer, Vec<BlobId>)> {
        if data.get(7) != Some(&format::LAYER_PAGES) {
            let layer = match &self.crypt {
                Crypt::Plain => format::decode_layer(data)?,
                Crypt::Keyed(k) => {
                    let l: Layer = crypt::decode(k, FileKind::Layer, b"", data)?;
                    l.validate()?;
                    l
                }
            };
            return Ok((layer, Vec::new()));
        }
        let list: crate::layer::Pages = match &self.crypt {
            Crypt::Plain => format::decode_pages(data)?,
            Crypt::Keyed(k) => crypt::decode_any(k, FileKind::Layer, b"", data)?,
        };
        let total = usize::try_from(list.entries).unwrap_or(usize::MAX);
        // Before reading any page: distinct pages in strictly ascending
        // order of their first paths, none empty, so a crafted list cannot
        // name one page many times to make the reader allocate without end.
        let mut ids = HashSet::with_capacity(list.pages.len());
        for (i, p) in list.pages.iter().enumerate() {
            if p.entries == 0
                || !ids.insert(p.blob)
                || (i > 0 && list.pages[i - 1].first >= p.first)
            {
                bail!(
                    "layer manifest's list of pages is corrupt (page {} of {})",
                    i + 1,
                    list.pages.len()
                );
            }
        }
        let mut entries: Vec<crate::layer::Entry> = Vec::new();
        for (i, p) in list.pages.iter().enumerate() {
            let raw = self
                .read_blob(&p.blob)
                .with_context(|| format!("page {} of {}", i + 1, list.pages.len()))?;
            let (page, rest): (Vec<crate::layer::Entry>, _) = postcard::take_from_bytes(&raw)
                .map_err(|e| anyhow!("page {} is corrupt: {e}", i + 1))?;
            if !rest.is_empty()
                || page.len() != p.entries as usize
                || page.first().map(|e| &e.path) != Some(&p.first)
                || list
                    .pages
                    .get(i + 1)
                    .is_some_and(|n| page.last().is_some_and(|l| l.path >= n.first))
            {
                bail!(
                    "page {} does not match the layer's list of pages: it is corrupt",
                    i + 1
                );
            }
            if entries.len() + page.len() > total {
                bail!("layer manifest has more entries than its list of pages says");
            }
            entries.extend(page);
        }
        if entries.len() != total {
            bail!("layer manifest has fewer entries than its list of pages says");
        }
        let layer = Layer { entries };
        layer.validate()?;
        Ok((layer, list.pages.iter().map(|p| p.blob).collect()))
    }

    /// Encode a new snapshot record; its id comes from these bytes.
    ///
    /// # Errors
    /// Serialization failure.
    pub fn seal_snapshot(&self, snap: &Snapshot) -> Result<Sealed> {
        match &self.crypt {
            Crypt::Plain => Ok(Sealed::new(
                FileKind::Snapshot,
                format::encode_sealed(FileKind::Snapshot, snap)?,
            )),
            // The name must be known before sealing (it is bound into the
            // record): a keyed hash of the record's first version.
            Crypt::Keyed(k) => {
                let plain = postcard::to_stdvec(snap).context("serializing")?;
                let id = k.name_of(b"snapshot", &plain);
                Ok(Sealed {
                    kind: FileKind::Snapshot,
                    id,
                    data: crypt::encode(k, FileKind::Snapshot, &id.0, snap)?,
                })
            }
        }
    }

    /// Encode and store a new snapshot record; returns its id.
    ///
    /// # Errors
    /// Write failure.
    pub fn write_snapshot(&self, snap: &Snapshot) -> Result<SnapshotId> {
        let sealed = self.seal_snapshot(snap)?;
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
        let data = self.encode_snapshot(id, snap)?;
        self.write_snapshot_data(id, &data)
    }

    /// The bytes of snapshot `id`'s record holding `snap`.
    ///
    /// # Errors
    /// Serialization failure.
    pub fn encode_snapshot(&self, id: &SnapshotId, snap: &Snapshot) -> Result<Vec<u8>> {
        encode_meta(&self.crypt, FileKind::Snapshot, &id.0.0, snap)
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
        decode_meta(&self.crypt, FileKind::Snapshot, &id.0.0, &data)
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

impl Repo {
    /// Decrypt (in an encrypted repository), decompress and verify a blob
    /// read from a pack.
    ///
    /// # Errors
    /// Corrupt data, failed authentication or a hash mismatch.
    pub fn decode_blob(&self, b: &PackBlob, raw: Vec<u8>) -> Result<Vec<u8>> {
        // Bound what a crafted table can make us allocate (found by fuzzing).
        if b.raw_len > MAX_BLOB {
            bail!(
                "blob {} claims {} bytes, more than laybak ever writes ({MAX_BLOB})",
                b.id.short(),
                b.raw_len
            );
        }
        let stored = match &self.crypt {
            Crypt::Plain => raw,
            Crypt::Keyed(k) => crypt::open_blob(k, &b.id, b.raw_len, b.compressed, &raw)?,
        };
        let data = if b.compressed {
            format::decompress_bounded(&stored, b.raw_len as u64)
                .map_err(|e| anyhow!("blob {} is corrupt ({e:#})", b.id.short()))?
        } else {
            stored
        };
        if data.len() != b.raw_len as usize || self.blob_id(&data) != b.id {
            bail!("blob {} is corrupt (blake3 mismatch)", b.id.short());
        }
        Ok(data)
    }

    /// Parse (and in an encrypted repository, authenticate) the blob
    /// table at the end of a pack file.
    ///
    /// # Errors
    /// Not a pack, truncated, forged, or an inconsistent table.
    pub fn parse_pack_tail(&self, data: &[u8]) -> Result<Vec<PackBlob>> {
        format::check_header(FileKind::Pack, data)?;
        match (&self.crypt, data[7] >= crypt::ENCRYPTED) {
            (Crypt::Plain, true) => {
                bail!(
                    "pack is encrypted in a plaintext repository: it is damaged or was put there by someone else"
                )
            }
            (Crypt::Keyed(_), false) => {
                bail!(
                    "pack is not encrypted in an encrypted repository: it is damaged or was put there by someone else"
                )
            }
            _ => {}
        }
        let n = data.len();
        // The length field: 4 bytes, sealed in an encrypted repository.
        let field = match &self.crypt {
            Crypt::Plain => 4,
            Crypt::Keyed(_) => 4 + crypt::OVERHEAD,
        };
        if n < 8 + field + 8 || &data[n - 8..] != PACK_TAIL {
            bail!("pack is truncated (no trailer)");
        }
        let at = n - 8 - field;
        let tl = match &self.crypt {
            Crypt::Plain => u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")),
            Crypt::Keyed(k) => {
                if at < 8 + crypt::OVERHEAD {
                    bail!("pack is truncated (no blob table)");
                }
                let sealed = &data[at..n - 8];
                let tag = &data[at - crypt::TAG_LEN..at];
                let l = k
                    .open(&crypt::pack_trailer_ad(&data[..8], tag), sealed)
                    // The form written before commit 521b68b (FORMAT.md §9.4).
                    .or_else(|_| k.open(&crypt::pack_trailer_ad(&data[..8], &[]), sealed))
                    .map_err(|_| anyhow!("pack trailer is corrupt (failed authentication)"))?;
                u32::from_le_bytes(
                    l.as_slice()
                        .try_into()
                        .map_err(|_| anyhow!("pack trailer is corrupt"))?,
                )
            }
        } as usize;
        if tl > at - 8 {
            bail!("pack trailer length {tl} is out of range");
        }
        let table = &data[at - tl..at];
        let opened;
        let table = match &self.crypt {
            Crypt::Plain => table,
            Crypt::Keyed(k) => {
                opened = k
                    .open(&crypt::pack_table_ad(&data[..8]), table)
                    .map_err(|_| anyhow!("pack trailer is corrupt (failed authentication)"))?;
                &opened[..]
            }
        };
        let (blobs, rest): (Vec<PackBlob>, _) = postcard::take_from_bytes(table)
            .map_err(|e| anyhow!("pack trailer is corrupt: {e}"))?;
        if !rest.is_empty() {
            bail!("pack trailer is corrupt: {} trailing bytes", rest.len());
        }
        let limit = (at - tl) as u64;
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

    /// Builds packs from stored blobs (for repacking).
    pub fn pack_assembler(&self) -> PackAssembler {
        PackAssembler {
            target: self.config.pack_size as usize,
            cur: PackBuf::new(&self.crypt),
            crypt: self.crypt.clone(),
        }
    }
}

struct PackBuf {
    data: Vec<u8>,
    blobs: Vec<PackBlob>,
}

impl PackBuf {
    fn new(c: &Crypt) -> PackBuf {
        let version = match c {
            Crypt::Plain => format::BASE_VERSION,
            Crypt::Keyed(_) => crypt::ENCRYPTED,
        };
        PackBuf {
            data: format::header_v(FileKind::Pack, version).to_vec(),
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
fn seal(mut p: PackBuf, c: &Crypt) -> Result<Option<SealedPack>> {
    if p.blobs.is_empty() {
        return Ok(None);
    }
    let mut table = postcard::to_stdvec(&p.blobs).context("serializing a pack table")?;
    let mut field = (table.len() as u32).to_le_bytes().to_vec();
    if let Crypt::Keyed(k) = c {
        table = k.seal(&crypt::pack_table_ad(&p.data[..8]), &table)?;
        // The table's length (so the number of blobs) is sealed too, bound
        // to the table's tag so that equal lengths give different fields.
        field = k.seal(
            &crypt::pack_trailer_ad(&p.data[..8], &table[table.len() - crypt::TAG_LEN..]),
            &(table.len() as u32).to_le_bytes(),
        )?;
        // Pad to Padmé of the whole file: a pack's size says little about
        // the sizes of the chunks in it.
        let len = (p.data.len() + table.len() + field.len() + 8) as u64;
        let pad = (crypt::padme(len) - len) as usize;
        p.data.extend_from_slice(&k.padding(&table, pad));
    }
    p.data.extend_from_slice(&table);
    p.data.extend_from_slice(&field);
    p.data.extend_from_slice(PACK_TAIL);
    let file = Sealed::new(FileKind::Pack, p.data);
    let index = IndexPack {
        id: PackId(file.id),
        size: file.len(),
        blobs: p.blobs,
    };
    Ok(Some(SealedPack { file, index }))
}

/// Builds packs from already stored (compressed) blobs, for repacking.
pub struct PackAssembler {
    target: usize,
    cur: PackBuf,
    crypt: Crypt,
}

impl PackAssembler {
    /// Add a blob's stored bytes (sealed records are copied as they are:
    /// their associated data does not name the pack); returns a finished
    /// pack when one fills.
    ///
    /// # Errors
    /// Sealing the table failed.
    pub fn add_stored(&mut self, b: &PackBlob, raw: &[u8]) -> Result<Option<SealedPack>> {
        let offset = self.cur.data.len() as u64;
        self.cur.data.extend_from_slice(raw);
        self.cur.blobs.push(PackBlob { offset, ..*b });
        if self.cur.data.len() >= self.target {
            seal(
                std::mem::replace(&mut self.cur, PackBuf::new(&self.crypt)),
                &self.crypt,
            )
        } else {
            Ok(None)
        }
    }

    /// The last, partly filled pack.
    ///
    /// # Errors
    /// Sealing the table failed.
    pub fn finish(self) -> Result<Option<SealedPack>> {
        seal(self.cur, &self.crypt)
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
    cache: OnceLock<Option<std::sync::RwLock<crate::blobcache::BlobCache>>>,
    /// Blobs stored by this packer and not yet handed to the cache.
    seen: Mutex<HashSet<BlobId>>,
    cur: Mutex<PackBuf>,
    /// Packs written and not yet listed in an index file, with the number
    /// of blobs in them.
    done: Mutex<(Vec<IndexPack>, usize)>,
    /// An index file is written once that number reaches this.
    index_every: usize,
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
            cur: Mutex::new(PackBuf::new(&repo.crypt)),
            done: Mutex::new((Vec::new(), 0)),
            index_every: index_blobs(),
            stats: Mutex::new((0, 0)),
        }
    }

    /// Blobs this packer holds in memory to skip repeats (tests).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        lock(&self.seen).len()
    }

    /// This packer, writing an index file every `n` blobs (tests).
    #[cfg(test)]
    pub(crate) fn index_every(self, n: usize) -> Packer<'r> {
        Packer {
            index_every: n,
            ..self
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

    /// The id of a blob's plaintext in this repository.
    pub fn blob_id(&self, data: &[u8]) -> BlobId {
        self.repo.blob_id(data)
    }

    /// The repository's chunker seed.
    pub fn chunker_seed(&self) -> u64 {
        self.repo.chunker_seed()
    }

    /// Store `data` under `id` (its [`Packer::blob_id`]) unless the repository or this
    /// run already has it.
    ///
    /// # Errors
    /// Index loading or pack writing failed.
    pub fn add(&self, id: BlobId, data: &[u8]) -> Result<()> {
        let cache = self.cache.get_or_init(|| {
            self.cache_dir.as_ref().and_then(|d| {
                crate::blobcache::BlobCache::open(d, self.repo)
                    .ok()
                    .map(std::sync::RwLock::new)
            })
        });
        let present = match cache {
            Some(c) => read_lock(c).contains(&id)? || lock(&self.repo.added).contains_key(&id),
            None => self.repo.locate(&id)?.is_some(),
        };
        if present {
            return Ok(());
        }
        debug_assert_eq!(id, self.blob_id(data), "a blob id not of this repository");
        if !lock(&self.seen).insert(id) {
            return Ok(());
        }
        let z = zstd::bulk::compress(data, self.repo.config.zstd_level)?;
        let (stored, compressed) = if z.len() < data.len() {
            (&z[..], true)
        } else {
            (data, false)
        };
        let sealed;
        let stored = match &self.repo.crypt {
            Crypt::Plain => stored,
            Crypt::Keyed(k) => {
                sealed = crypt::seal_blob(k, &id, data.len() as u32, compressed, stored)?;
                &sealed[..]
            }
        };
        let full = {
            let mut cur = lock(&self.cur);
            // (Capped: `pack_size` comes from the repository's config.)
            let target = (self.repo.config.pack_size as usize).min(256 << 20);
            if cur.data.capacity() < target {
                // Room for a full pack and its last chunk, once: growing by
                // doubling would copy the pack and leave it twice its size.
                let room = target + (4 << 20) + 4096;
                let len = cur.data.len();
                cur.data.reserve_exact(room.saturating_sub(len));
            }
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
                Some(std::mem::replace(&mut *cur, PackBuf::new(&self.repo.crypt)))
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
        let Some(pack) = seal(p, &self.repo.crypt)? else {
            return Ok(());
        };
        crate::failpoint::hit("pack-write")?;
        self.repo
            .put(&pack.file)
            .with_context(|| format!("cannot write a pack to {}", self.repo.location.display()))?;
        let due = {
            let mut done = lock(&self.done);
            done.1 += pack.index.blobs.len();
            done.0.push(pack.index);
            done.1 >= self.index_every
        };
        if due {
            self.write_index()?;
        }
        Ok(())
    }

    /// List the packs written so far in an index file. An import of
    /// millions of blobs writes one every [`INDEX_BLOBS`] blobs: the list
    /// of packs, and the set of blobs stored (handed to the blob cache,
    /// which keeps most of them on disk), stay bounded.
    fn write_index(&self) -> Result<()> {
        let (done, _) = std::mem::take(&mut *lock(&self.done));
        if done.is_empty() {
            return Ok(());
        }
        crate::failpoint::hit("index-write")?;
        let index = self.repo.write_index(&done)?;
        self.repo.note_written(&done);
        if let Some(Some(cache)) = self.cache.get() {
            let ids = || done.iter().flat_map(|p| p.blobs.iter().map(|b| b.id));
            // In the cache first, then out of `seen`: a blob is always in
            // one of them. (A merge that fails keeps them in memory.)
            if write_lock(cache).absorb(index, ids()).is_ok() {
                let mut seen = lock(&self.seen);
                for id in ids() {
                    seen.remove(&id);
                }
                let keep = seen.len() * 2;
                seen.shrink_to(keep);
            }
        }
        Ok(())
    }

    /// Flush the last pack and write the index for everything this packer
    /// stored and did not list yet.
    ///
    /// # Errors
    /// Pack or index write failed.
    pub fn finish(self) -> Result<Added> {
        let last = std::mem::replace(&mut *lock(&self.cur), PackBuf::new(&self.repo.crypt));
        self.write_pack(last)?;
        self.write_index()?;
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

/// A layer's entries in order, as [`Repo::stage_entries`] takes them.
pub type Entries<'e> = Box<dyn Iterator<Item = Result<Cow<'e, crate::layer::Entry>>> + 'e>;

/// The entries of a layer in memory.
fn borrowed(layer: &Layer) -> Entries<'_> {
    Box::new(layer.entries.iter().map(|e| Ok(Cow::Borrowed(e))))
}

/// A packer writes an index file once its unlisted packs hold this many
/// blobs.
pub const INDEX_BLOBS: usize = 1 << 16;

/// [`INDEX_BLOBS`], or `LAYBAK_INDEX_BLOBS` (for tests).
fn index_blobs() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| env_count("LAYBAK_INDEX_BLOBS", INDEX_BLOBS))
}

/// The positive number in environment variable `name` (a test knob), or
/// `default`.
pub(crate) fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// Entries per layer page: [`crate::layer::PAGE_ENTRIES`], or
/// `LAYBAK_PAGE_ENTRIES` (for tests: small pages on small trees).
fn page_entries() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| env_count("LAYBAK_PAGE_ENTRIES", crate::layer::PAGE_ENTRIES))
}

fn read_lock<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::password::{Given, NoPassword};

    fn pw() -> Given {
        Given("pw".to_string().into())
    }

    /// A layer's file and the pages it handed over, cut at `max` entries.
    fn cut_of(repo: &Repo, layer: &Layer, max: usize) -> (Vec<u8>, Vec<(BlobId, Vec<u8>)>) {
        let mut pages = Vec::new();
        let file = repo
            .layer_file(&|| Ok(borrowed(layer)), true, max, &mut |id, b| {
                pages.push((id, b));
                Ok(())
            })
            .unwrap();
        (file, pages)
    }

    #[test]
    fn a_layer_of_many_pages_round_trips_and_its_list_is_checked() {
        use crate::layer::{Entry, Meta, Node, PageRef, Pages};
        let entry = |p: String, dir: bool| Entry {
            path: p.into_bytes(),
            node: if dir {
                Node::dir(crate::layer::DirKind::Merge)
            } else {
                Node::Symlink {
                    target: b"t".to_vec(),
                }
            },
            meta: Meta::default(),
            link: None,
        };
        let mut entries = vec![entry(String::new(), true), entry("d".into(), true)];
        entries.extend((0..50).map(|i| entry(format!("d/{i:03}"), false)));
        let layer = Layer { entries };
        for protection in [Protection::Plaintext, Protection::test("pw")] {
            let d = tempfile::tempdir().unwrap();
            let repo = Repo::init(&d.path().join("r"), &protection).unwrap();
            // One page: today's single file.
            let cut = |max| cut_of(&repo, &layer, max);
            let (one, none) = cut(1000);
            assert!(none.is_empty());
            assert_ne!(one[7], format::LAYER_PAGES);
            assert_eq!(cut(52).1.len(), 0, "52 entries make one page of 52");
            assert_eq!(cut(51).1.len(), 2);
            let (file, pages) = cut(7);
            assert_eq!(file[7], format::LAYER_PAGES);
            assert_eq!(pages.len(), 8);
            let put = |file: Vec<u8>, pages: &[(BlobId, Vec<u8>)]| {
                let p = Packer::new(&repo);
                for (id, b) in pages {
                    p.add(*id, b).unwrap();
                }
                p.finish().unwrap();
                repo.put_layer(file).unwrap()
            };
            let id = put(file, &pages);
            let (back, blobs) = repo.read_layer_parts(&id).unwrap();
            assert_eq!(back, layer);
            assert_eq!(blobs, pages.iter().map(|(b, _)| *b).collect::<Vec<_>>());
            // A list that does not match its pages is refused.
            let refs: Vec<PageRef> = pages
                .iter()
                .zip(layer.entries.chunks(7))
                .map(|((b, _), c)| PageRef {
                    blob: *b,
                    entries: c.len() as u32,
                    first: c[0].path.clone(),
                })
                .collect();
            let encode = |list: &Pages| repo.pages_file(list).unwrap();
            let good = Pages {
                entries: 52,
                pages: refs.clone(),
            };
            assert_eq!(repo.read_layer(&put(encode(&good), &[])).unwrap(), layer);
            let mut bad = vec![
                Pages {
                    entries: 51,
                    ..good.clone()
                },
                Pages {
                    entries: 53,
                    ..good.clone()
                },
                Pages {
                    entries: 45,
                    pages: refs[1..].to_vec(),
                },
            ];
            let mut swapped = good.clone();
            swapped.pages.swap(2, 3);
            bad.push(swapped);
            let mut miscounted = good.clone();
            miscounted.pages[0].entries = 6;
            bad.push(miscounted);
            let mut misnamed = good.clone();
            misnamed.pages[4].first = b"d/999".to_vec();
            bad.push(misnamed);
            let mut repeated = good.clone();
            repeated.entries += 7;
            repeated.pages.push(refs[0].clone());
            bad.push(repeated);
            let mut empty = good.clone();
            empty.pages[7].entries = 0;
            bad.push(empty);
            let mut absent = good.clone();
            absent.pages[5].blob = repo.blob_id(b"no such page");
            bad.push(absent);
            for (i, list) in bad.iter().enumerate() {
                let id = put(encode(list), &[]);
                assert!(repo.read_layer(&id).is_err(), "bad list {i} was accepted");
            }
            // An entry too large for a blob: the layer stays one file.
            let mut big = layer.clone();
            big.entries[5].node = Node::Symlink {
                target: vec![b'x'; MAX_BLOB as usize + 1],
            };
            let (file, pages) = cut_of(&repo, &big, 1);
            assert_ne!(file[7], format::LAYER_PAGES);
            let id = put(file, &pages);
            assert_eq!(repo.read_layer_parts(&id).unwrap(), (big, Vec::new()));
        }
    }

    #[test]
    fn packs_with_equal_blob_counts_end_differently() {
        // The sealed length field binds the table's tag: two packs with
        // one blob each must not share their last 52 bytes.
        let c = Crypt::Keyed(std::sync::Arc::new(crypt::Keys::new(
            crypt::Master::from_bytes([3; 32]),
        )));
        let tail = |byte: u8| {
            let mut p = PackBuf::new(&c);
            p.blobs.push(PackBlob {
                id: BlobId(Id([byte; 32])),
                offset: 8,
                len: 1,
                raw_len: 1,
                compressed: false,
            });
            p.data.push(byte);
            let data = seal(p, &c).unwrap().unwrap().file.data;
            data[data.len() - 52..].to_vec()
        };
        assert_ne!(tail(1), tail(2));
    }

    #[test]
    fn pack_round_trip_and_corruption() {
        for protection in [Protection::Plaintext, Protection::test("pw")] {
            let d = tempfile::tempdir().unwrap();
            let repo = Repo::init(&d.path().join("r"), &protection).unwrap();
            let p = Packer::new(&repo);
            let a = vec![7u8; 100_000];
            let b: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
            let (ia, ib) = (repo.blob_id(&a), repo.blob_id(&b));
            assert_eq!(ia == BlobId(Id::of(&a)), !repo.is_encrypted());
            p.add(ia, &a).unwrap();
            p.add(ib, &b).unwrap();
            p.add(ia, &a).unwrap();
            assert_eq!(p.finish().unwrap().blobs, 2);
            let repo = Repo::open(&d.path().join("r"), &pw()).unwrap();
            assert_eq!(repo.read_blob(&ia).unwrap(), a);
            assert_eq!(repo.read_blob(&ib).unwrap(), b);
            let packs = repo.list(FileKind::Pack).unwrap().files;
            assert_eq!(packs.len(), 1);
            let path = d
                .path()
                .join("r")
                .join(object_name(FileKind::Pack, &packs[0].id));
            let data = std::fs::read(&path).unwrap();
            assert_eq!(repo.parse_pack_tail(&data).unwrap().len(), 2);
            let mut bad = data.clone();
            let loc = repo.index().unwrap()[&ib];
            bad[loc.blob.offset as usize + 3] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            let repo = Repo::open(&d.path().join("r"), &pw()).unwrap();
            assert!(repo.read_blob(&ib).is_err());
            assert!(repo.parse_pack_tail(&data[..data.len() - 1]).is_err());
            if repo.is_encrypted() {
                // The table and its sealed length are authenticated: a
                // flip in either is refused.
                let n = data.len();
                let field = n - 8 - 4 - crypt::OVERHEAD;
                for at in [field - 5, field + 3, n - 20] {
                    let mut t = data.clone();
                    t[at] ^= 1;
                    assert!(repo.parse_pack_tail(&t).is_err(), "flip at {at} of {n}");
                }
                // The form written before 2026-12-02 (length sealed
                // without the table's tag) is still read.
                let keys = repo.crypt().keys().unwrap();
                let tag = &data[field - crypt::TAG_LEN..field];
                let tl = keys
                    .open(
                        &crypt::pack_trailer_ad(&data[..8], tag),
                        &data[field..n - 8],
                    )
                    .unwrap();
                let mut old = data[..field].to_vec();
                old.extend_from_slice(
                    &keys
                        .seal(&crypt::pack_trailer_ad(&data[..8], &[]), &tl)
                        .unwrap(),
                );
                old.extend_from_slice(PACK_TAIL);
                assert_eq!(repo.parse_pack_tail(&old).unwrap().len(), 2);
                // Padded to Padmé; nothing of the plaintext is in the pack.
                assert_eq!(data.len() as u64, crypt::padme(data.len() as u64));
                // Nothing of the plaintext is in the pack.
                assert!(!data.windows(16).any(|w| w == &b[..16]));
            }
        }
    }

    #[test]
    fn encrypted_repositories_need_the_password_and_refuse_plaintext_files() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r");
        let repo = Repo::init(&path, &Protection::test("pw")).unwrap();
        assert!(repo.key.is_some());
        let e = Repo::open(&path, &NoPassword).err().unwrap();
        assert_eq!(crate::error::kind(&e), crate::error::Kind::Password);
        let e = Repo::open(&path, &Given("nope".to_string().into()))
            .err()
            .unwrap();
        assert_eq!(crate::error::kind(&e), crate::error::Kind::Password);
        assert!(e.to_string().contains("wrong password"), "{e}");
        // A planted plaintext index is refused, not trusted.
        let planted = format::encode(FileKind::Index, &Vec::<IndexPack>::new()).unwrap();
        let id = repo.write_file(FileKind::Index, planted).unwrap();
        let repo = Repo::open(&path, &pw()).unwrap();
        let e = repo.read_index(&IndexId(id)).unwrap_err();
        assert!(format!("{e:#}").contains("not encrypted"), "{e:#}");
        // Keys: a second one opens it; the last and the current one stay.
        let k2 = repo.add_key(b"second", crypt::TEST_KDF).unwrap();
        let by2 = Repo::open(&path, &Given("second".to_string().into())).unwrap();
        assert_eq!(by2.key, Some(k2));
        assert!(by2.remove_key(&k2).is_err());
        by2.remove_key(&repo.key.unwrap()).unwrap();
        assert!(Repo::open(&path, &pw()).is_err());
        assert!(by2.remove_key(&k2).is_err());
    }

    #[test]
    fn backend_faults_give_errors_never_wrong_data() {
        use crate::backend::testing::{Fault, Faulty};
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("r");
        Repo::init(&path, &Protection::test("pw")).unwrap();
        let faulty = Arc::new(Faulty::new(LocalBackend::new(&path)));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        // A failing write leaves no pack and reports the error.
        let repo = Repo::open_backend(&path, faulty.clone(), &pw()).unwrap();
        let id = repo.blob_id(&data);
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
        let repo = Repo::open_backend(&path, faulty.clone(), &pw()).unwrap();
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
        let e = Repo::open(&d.path().join("nope"), &NoPassword)
            .err()
            .unwrap();
        assert!(e.to_string().contains("laybak init"), "{e}");
        let e = Repo::open(d.path(), &NoPassword).err().unwrap();
        assert!(e.to_string().contains("not a laybak repository"), "{e}");
        std::fs::write(d.path().join("x"), "").unwrap();
        assert!(Repo::init(d.path(), &Protection::Plaintext).is_err());
    }
}

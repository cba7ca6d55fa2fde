//! Encryption at rest: format version 3. Pure functions, no I/O.
//!
//! An encrypted repository has one random 32-byte master secret. Each key
//! file (`keys/ID`) wraps it under a key derived from one password with
//! Argon2id. From the master, BLAKE3's key derivation makes the subkeys:
//! the XChaCha20-Poly1305 key every stored byte is sealed with, the key of
//! the synthetic nonces, the key of blob ids (keyed BLAKE3, so the plain
//! hash of a file confirms nothing) and of record names, and the chunker's
//! seed. `docs/FORMAT.md` §9 gives the bytes, `docs/DESIGN.md` the threat
//! model.
//!
//! Nonces are synthetic: keyed BLAKE3 of the associated data and the
//! plaintext (the SIV construction). Equal inputs give equal bytes, which
//! keeps every content-addressed file deterministic (a rerun writes the
//! same pack, the same squashed layer); unequal inputs get independent
//! 192-bit nonces, so no two hosts need to coordinate.

use crate::format::{self, BlobId, FileKind, Id, Time};
use anyhow::{Result, anyhow, bail};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::sync::Arc;
use zeroize::Zeroizing;

/// Format version of every file of an encrypted repository.
pub const ENCRYPTED: u8 = 3;
/// Bytes of a nonce (XChaCha20).
pub const NONCE_LEN: usize = 24;
/// Bytes of a Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// What sealing adds to a plaintext: nonce and tag.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

// BLAKE3 key-derivation contexts. Part of the format: never change them.
const CTX_AEAD: &str = "laybak 2026-12-02 format 3 aead key";
const CTX_NONCE: &str = "laybak 2026-12-02 format 3 synthetic nonce key";
const CTX_BLOB_ID: &str = "laybak 2026-12-02 format 3 blob id key";
const CTX_NAME: &str = "laybak 2026-12-02 format 3 record name key";
const CTX_CHUNKER: &str = "laybak 2026-12-02 format 3 chunker seed";
const CTX_PAD: &str = "laybak 2026-12-02 format 3 pack padding key";

/// The repository's master secret.
pub struct Master(Zeroizing<[u8; 32]>);

impl Master {
    /// A new random master secret.
    ///
    /// # Errors
    /// The system has no randomness to give.
    pub fn generate() -> Result<Master> {
        let mut m = Zeroizing::new([0u8; 32]);
        random(&mut m[..])?;
        Ok(Master(m))
    }

    /// A given master secret (fuzzing and tests).
    pub fn from_bytes(b: [u8; 32]) -> Master {
        Master(Zeroizing::new(b))
    }
}

/// Fill `buf` from the operating system's random source.
///
/// # Errors
/// `getrandom(2)` failed.
pub fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| anyhow!("no randomness from the system: {e}"))
}

/// The subkeys of one repository.
pub struct Keys {
    master: Master,
    aead: XChaCha20Poly1305,
    nonce_key: Zeroizing<[u8; 32]>,
    blob_id_key: Zeroizing<[u8; 32]>,
    name_key: Zeroizing<[u8; 32]>,
    pad_key: Zeroizing<[u8; 32]>,
    chunker_seed: u64,
}

impl Keys {
    /// Derive the subkeys of `master`.
    pub fn new(master: Master) -> Keys {
        let m: &[u8; 32] = &master.0;
        let aead_key = Zeroizing::new(blake3::derive_key(CTX_AEAD, m));
        let seed = blake3::derive_key(CTX_CHUNKER, m);
        let mut chunker_seed = u64::from_le_bytes(seed[..8].try_into().expect("8 bytes"));
        // fastcdc treats 0 as "no seed".
        if chunker_seed == 0 {
            chunker_seed = 1;
        }
        Keys {
            aead: XChaCha20Poly1305::new((&*aead_key).into()),
            nonce_key: Zeroizing::new(blake3::derive_key(CTX_NONCE, m)),
            blob_id_key: Zeroizing::new(blake3::derive_key(CTX_BLOB_ID, m)),
            name_key: Zeroizing::new(blake3::derive_key(CTX_NAME, m)),
            pad_key: Zeroizing::new(blake3::derive_key(CTX_PAD, m)),
            chunker_seed,
            master,
        }
    }

    fn nonce(&self, ad: &[u8], plain: &[u8]) -> XNonce {
        let mut h = blake3::Hasher::new_keyed(&self.nonce_key);
        h.update(&(ad.len() as u64).to_le_bytes());
        h.update(ad);
        h.update(plain);
        let out = h.finalize();
        *XNonce::from_slice(&out.as_bytes()[..NONCE_LEN])
    }

    /// `nonce ‖ ciphertext ‖ tag` of `plain`, authenticating `ad` too.
    ///
    /// # Errors
    /// A plaintext beyond XChaCha20's 256 GiB (never written by laybak).
    pub fn seal(&self, ad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
        let nonce = self.nonce(ad, plain);
        let ct = self
            .aead
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: ad,
                },
            )
            .map_err(|_| anyhow!("cannot encrypt {} bytes", plain.len()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// The plaintext of bytes written by [`Keys::seal`] with the same `ad`.
    ///
    /// # Errors
    /// Too short, or authentication failed (altered, damaged, moved to
    /// another role, or sealed with another repository's key).
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        if sealed.len() < OVERHEAD {
            bail!("too short to be encrypted data");
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.aead
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: ad })
            .map_err(|_| anyhow!("authentication failed"))
    }

    /// Keyed id of a blob's plaintext.
    pub fn blob_id(&self, data: &[u8]) -> BlobId {
        BlobId(Id(*blake3::keyed_hash(&self.blob_id_key, data).as_bytes()))
    }

    /// Keyed name of a record (snapshot) whose name must be known before
    /// it is sealed: `what` keeps roles apart.
    pub fn name_of(&self, what: &[u8], content: &[u8]) -> Id {
        let mut h = blake3::Hasher::new_keyed(&self.name_key);
        h.update(&(what.len() as u64).to_le_bytes());
        h.update(what);
        h.update(content);
        Id(*h.finalize().as_bytes())
    }

    /// `n` padding bytes for a pack whose sealed table is `table`:
    /// keyed BLAKE3 output, as indistinguishable from ciphertext as the
    /// rest, and deterministic (a pack rebuilt from the same blobs is the
    /// same file).
    pub fn padding(&self, table: &[u8], n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        blake3::Hasher::new_keyed(&self.pad_key)
            .update(table)
            .finalize_xof()
            .fill(&mut out);
        out
    }

    /// The chunker seed (never 0).
    pub fn chunker_seed(&self) -> u64 {
        self.chunker_seed
    }
}

/// How a repository stores bytes: in the clear (versions 1 and 2) or
/// sealed (version 3).
#[derive(Clone)]
pub enum Crypt {
    /// Plaintext repository.
    Plain,
    /// Encrypted repository.
    Keyed(Arc<Keys>),
}

impl Crypt {
    /// Id of a blob's plaintext: blake3, keyed in an encrypted repository.
    pub fn blob_id(&self, data: &[u8]) -> BlobId {
        match self {
            Crypt::Plain => BlobId(Id::of(data)),
            Crypt::Keyed(k) => k.blob_id(data),
        }
    }

    /// FastCDC seed: 0 (unseeded) for plaintext repositories.
    pub fn chunker_seed(&self) -> u64 {
        match self {
            Crypt::Plain => 0,
            Crypt::Keyed(k) => k.chunker_seed(),
        }
    }

    /// Whether stored bytes are encrypted.
    pub fn is_encrypted(&self) -> bool {
        matches!(self, Crypt::Keyed(_))
    }

    /// The keys, for an encrypted repository.
    pub fn keys(&self) -> Option<&Keys> {
        match self {
            Crypt::Plain => None,
            Crypt::Keyed(k) => Some(k),
        }
    }
}

/// Associated data of a file: its 8-byte header, then what binds it to its
/// name where the name is not the hash of the bytes (snapshot, lock).
fn file_ad(header: &[u8], bind: &[u8]) -> Vec<u8> {
    let mut ad = header.to_vec();
    ad.extend_from_slice(bind);
    ad
}

/// Encode a metadata file of an encrypted repository: the plaintext
/// header (version 3), then the sealed zstd(postcard(value)).
///
/// # Errors
/// Serialization failure (not expected for valid values).
pub fn encode<T: Serialize>(
    keys: &Keys,
    kind: FileKind,
    bind: &[u8],
    value: &T,
) -> Result<Vec<u8>> {
    encode_v(keys, kind, ENCRYPTED, bind, value)
}

/// As [`encode`], with the header's version `version` (a paged layer
/// manifest is version [`format::LAYER_PAGES`]).
///
/// # Errors
/// As [`encode`].
pub fn encode_v<T: Serialize>(
    keys: &Keys,
    kind: FileKind,
    version: u8,
    bind: &[u8],
    value: &T,
) -> Result<Vec<u8>> {
    let z = format::compress_payload(value)?;
    let h = format::header_v(kind, version);
    let mut out = h.to_vec();
    out.extend_from_slice(&keys.seal(&file_ad(&h, bind), &z)?);
    Ok(out)
}

/// Decode a file written by [`encode`] with the same `bind`.
///
/// # Errors
/// Wrong header, not version 3, failed authentication, or a bad payload.
pub fn decode<T: DeserializeOwned>(
    keys: &Keys,
    kind: FileKind,
    bind: &[u8],
    data: &[u8],
) -> Result<T> {
    if data.get(7) == Some(&format::LAYER_PAGES) {
        bail!(
            "{} has format version {}, where one of version {ENCRYPTED} is expected: it is corrupt",
            kind.name(),
            format::LAYER_PAGES
        );
    }
    decode_any(keys, kind, bind, data)
}

/// As [`decode`], accepting version 3 and, for a layer file, version
/// [`format::LAYER_PAGES`]; the caller tells them apart by `data[7]`.
///
/// # Errors
/// As [`decode`].
pub fn decode_any<T: DeserializeOwned>(
    keys: &Keys,
    kind: FileKind,
    bind: &[u8],
    data: &[u8],
) -> Result<T> {
    let body = format::check_header(kind, data)?;
    let paged = kind == FileKind::Layer && data[7] == format::LAYER_PAGES;
    if data[7] != ENCRYPTED && !paged {
        bail!(
            "{} is not encrypted (format version {}) in an encrypted repository: it is damaged or was put there by someone else",
            kind.name(),
            data[7]
        );
    }
    let z = keys.open(&file_ad(&data[..8], bind), body).map_err(|_| {
        anyhow!(
            "{} is corrupt: it failed authentication (altered, damaged, or not this repository's)",
            kind.name()
        )
    })?;
    format::decode_payload(kind, &z)
}

/// Associated data of a blob inside a pack: what the index says about it.
fn blob_ad(id: &BlobId, raw_len: u32, compressed: bool) -> [u8; 41] {
    let mut ad = [0u8; 41];
    ad[..4].copy_from_slice(b"blob");
    ad[4..36].copy_from_slice(&id.0.0);
    ad[36..40].copy_from_slice(&raw_len.to_le_bytes());
    ad[40] = compressed as u8;
    ad
}

/// Seal a blob's stored (maybe compressed) bytes.
///
/// # Errors
/// As [`Keys::seal`].
pub fn seal_blob(
    keys: &Keys,
    id: &BlobId,
    raw_len: u32,
    compressed: bool,
    stored: &[u8],
) -> Result<Vec<u8>> {
    keys.seal(&blob_ad(id, raw_len, compressed), stored)
}

/// The stored bytes of a sealed blob record.
///
/// # Errors
/// Failed authentication: damaged, or the index lies about it.
pub fn open_blob(
    keys: &Keys,
    id: &BlobId,
    raw_len: u32,
    compressed: bool,
    record: &[u8],
) -> Result<Vec<u8>> {
    keys.open(&blob_ad(id, raw_len, compressed), record)
        .map_err(|_| anyhow!("blob {} is corrupt (failed authentication)", id.short()))
}

/// Padmé (Nikitin et al., "Reducing metadata leakage from encrypted files
/// and communication with PURBs", PETS 2019): `len` rounded up so that
/// only O(log log len) of its bits show, at most 12 % more (about 3 % at
/// pack sizes).
pub fn padme(len: u64) -> u64 {
    if len < 2 {
        return len;
    }
    let e = 63 - u64::from(len.leading_zeros());
    let s = 64 - u64::from(e.leading_zeros());
    let mask = (1u64 << (e - s)) - 1;
    (len + mask) & !mask
}

/// Associated data of a pack's blob table.
pub fn pack_table_ad(header: &[u8]) -> Vec<u8> {
    file_ad(header, b"pack table")
}

/// Associated data of a pack's sealed table length. `before` is the 16
/// bytes in front of the field: in a pack this writer made, the sealed
/// table's tag, so the field's synthetic nonce differs per table and
/// packs with equal blob counts do not carry equal fields. Packs written
/// before commit 521b68b sealed the field with `before` empty (FORMAT.md §9.4);
/// readers accept both.
pub fn pack_trailer_ad(header: &[u8], before: &[u8]) -> Vec<u8> {
    let mut ad = file_ad(header, b"pack trailer");
    ad.extend_from_slice(before);
    ad
}

/// Argon2id parameters of one key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kdf {
    /// Memory, KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub lanes: u32,
}

/// Trivially cheap parameters, for tests only: a key made with them is
/// no harder to guess than its password.
pub const TEST_KDF: Kdf = Kdf {
    memory_kib: 64,
    iterations: 1,
    lanes: 1,
};

/// Largest Argon2 memory a key file may ask for (256 MiB, four times what
/// laybak uses): a crafted key file must not exhaust the machine.
pub const MAX_KDF_MEMORY_KIB: u32 = 256 << 10;

impl Kdf {
    /// Parameters for a new key: `LAYBAK_KDF=MEMORY_KIB,ITERATIONS` if
    /// set (tests; it weakens the key), else 64 MiB and as many passes as
    /// take about half a second here (at least 2).
    ///
    /// # Errors
    /// A malformed `LAYBAK_KDF`.
    pub fn for_new_key() -> Result<Kdf> {
        if let Ok(v) = std::env::var("LAYBAK_KDF") {
            let parsed = v.split_once(',').and_then(|(m, t)| {
                Some(Kdf {
                    memory_kib: m.trim().parse().ok()?,
                    iterations: t.trim().parse().ok()?,
                    lanes: 1,
                })
            });
            let kdf = parsed.filter(|k| k.validate().is_ok()).ok_or_else(|| {
                anyhow!(
                    "LAYBAK_KDF={v:?} is not MEMORY_KIB,ITERATIONS (e.g. 65536,3): fix or unset it"
                )
            })?;
            return Ok(kdf);
        }
        // Time one pass and three: the difference is the cost of a pass,
        // the rest (allocating and touching 64 MiB) is paid once.
        let time = |iterations| -> Result<f64> {
            let k = Kdf {
                memory_kib: 64 << 10,
                iterations,
                lanes: 1,
            };
            let t = std::time::Instant::now();
            k.derive(b"calibration", &[0u8; 32])?;
            Ok(t.elapsed().as_secs_f64())
        };
        let (one, three) = (time(1)?, time(3)?);
        let pass = ((three - one) / 2.0).max(1e-3);
        let fixed = (one - pass).max(0.0);
        let iterations = (((0.5 - fixed) / pass).round().max(0.0) as u32).clamp(2, 32);
        Ok(Kdf {
            memory_kib: 64 << 10,
            iterations,
            lanes: 1,
        })
    }

    /// Refuse parameters no key file of ours has, and costs that could
    /// exhaust the machine.
    ///
    /// # Errors
    /// Out of range.
    pub fn validate(&self) -> Result<()> {
        if !(1..=16).contains(&self.lanes)
            || !(1..=32).contains(&self.iterations)
            || self.memory_kib < 8 * self.lanes
            || self.memory_kib > MAX_KDF_MEMORY_KIB
        {
            bail!(
                "key file has Argon2 parameters out of range ({} KiB, {} passes, {} lanes)",
                self.memory_kib,
                self.iterations,
                self.lanes
            );
        }
        Ok(())
    }

    /// The 32-byte key Argon2id derives from `password` and `salt`.
    ///
    /// # Errors
    /// Invalid parameters.
    pub fn derive(&self, password: &[u8], salt: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>> {
        self.validate()?;
        let params = argon2::Params::new(self.memory_kib, self.iterations, self.lanes, Some(32))
            .map_err(|e| anyhow!("Argon2 parameters: {e}"))?;
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = Zeroizing::new([0u8; 32]);
        a.hash_password_into(password, salt, &mut out[..])
            .map_err(|e| anyhow!("Argon2: {e}"))?;
        Ok(out)
    }
}

/// A key file: the master secret wrapped under one password, and who made
/// it when, sealed under the master secret (only holders of some key of
/// the repository can read it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyFile {
    /// Argon2id parameters.
    pub kdf: Kdf,
    /// Argon2 salt.
    pub salt: [u8; 32],
    /// `nonce ‖ XChaCha20-Poly1305(master) ‖ tag`, 72 bytes.
    pub wrapped: Vec<u8>,
    /// [`KeyMeta`], sealed with the repository's keys.
    pub meta: Vec<u8>,
}

/// What `key list` shows about a key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyMeta {
    /// When it was made.
    pub created: Time,
    /// Host it was made on.
    pub host: String,
}

/// Length of [`KeyFile::wrapped`].
pub const WRAPPED_LEN: usize = NONCE_LEN + 32 + TAG_LEN;
/// Largest key file read (a crafted one must not cost memory).
pub const MAX_KEY_FILE: usize = 4096;

impl KeyFile {
    fn header() -> [u8; 8] {
        format::header_v(FileKind::Key, ENCRYPTED)
    }

    fn wrap_ad(kdf: &Kdf, salt: &[u8; 32]) -> Result<Vec<u8>> {
        let mut ad = Self::header().to_vec();
        ad.extend_from_slice(
            &postcard::to_stdvec(&(kdf, salt))
                .map_err(|e| anyhow!("serializing a key file: {e}"))?,
        );
        Ok(ad)
    }

    fn meta_ad(salt: &[u8; 32]) -> Vec<u8> {
        let mut ad = Self::header().to_vec();
        ad.extend_from_slice(b"key meta");
        ad.extend_from_slice(salt);
        ad
    }

    /// Wrap the master secret of `keys` under `password`.
    ///
    /// # Errors
    /// No randomness, or invalid parameters.
    pub fn wrap(keys: &Keys, password: &[u8], kdf: Kdf, host: String) -> Result<KeyFile> {
        let mut salt = [0u8; 32];
        random(&mut salt)?;
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let kek = kdf.derive(password, &salt)?;
        let ct = XChaCha20Poly1305::new((&*kek).into())
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &keys.master.0[..],
                    aad: &Self::wrap_ad(&kdf, &salt)?,
                },
            )
            .map_err(|_| anyhow!("cannot wrap the master key"))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&ct);
        let meta = KeyMeta {
            created: Time::now(),
            host,
        };
        let meta = keys.seal(
            &Self::meta_ad(&salt),
            &postcard::to_stdvec(&meta).map_err(|e| anyhow!("serializing a key file: {e}"))?,
        )?;
        Ok(KeyFile {
            kdf,
            salt,
            wrapped,
            meta,
        })
    }

    /// The master secret, if `password` is this key's.
    ///
    /// # Errors
    /// Invalid parameters or a malformed wrapped key (a damaged key file).
    pub fn unwrap(&self, password: &[u8]) -> Result<Option<Master>> {
        if self.wrapped.len() != WRAPPED_LEN {
            bail!(
                "key file is corrupt: wrapped key of {} bytes",
                self.wrapped.len()
            );
        }
        let kek = self.kdf.derive(password, &self.salt)?;
        let (nonce, ct) = self.wrapped.split_at(NONCE_LEN);
        let Ok(plain) = XChaCha20Poly1305::new((&*kek).into()).decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ct,
                aad: &Self::wrap_ad(&self.kdf, &self.salt)?,
            },
        ) else {
            return Ok(None);
        };
        let plain = Zeroizing::new(plain);
        let mut m = Zeroizing::new([0u8; 32]);
        m.copy_from_slice(&plain);
        Ok(Some(Master(m)))
    }

    /// Who made the key when; opening it proves the key belongs to the
    /// repository of `keys`.
    ///
    /// # Errors
    /// The key file is another repository's, or damaged.
    pub fn meta(&self, keys: &Keys) -> Result<KeyMeta> {
        let plain = keys
            .open(&Self::meta_ad(&self.salt), &self.meta)
            .map_err(|_| anyhow!("key file is not this repository's, or damaged"))?;
        let (m, rest): (KeyMeta, _) =
            postcard::take_from_bytes(&plain).map_err(|e| anyhow!("key file is corrupt: {e}"))?;
        if !rest.is_empty() {
            bail!("key file is corrupt: {} trailing bytes", rest.len());
        }
        Ok(m)
    }

    /// The key file's bytes: header (kind `Y`, version 3), then postcard.
    ///
    /// # Errors
    /// Serialization failure.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Self::header().to_vec();
        out.extend_from_slice(
            &postcard::to_stdvec(self).map_err(|e| anyhow!("serializing a key file: {e}"))?,
        );
        Ok(out)
    }

    /// Parse and validate a key file.
    ///
    /// # Errors
    /// Not a key file, a newer version, too big, or malformed.
    pub fn decode(data: &[u8]) -> Result<KeyFile> {
        if data.len() > MAX_KEY_FILE {
            bail!("key file is corrupt: {} bytes", data.len());
        }
        let body = format::check_header(FileKind::Key, data)?;
        if data[7] != ENCRYPTED {
            bail!("key file has format version {}, expected 3", data[7]);
        }
        let (kf, rest): (KeyFile, _) =
            postcard::take_from_bytes(body).map_err(|e| anyhow!("key file is corrupt: {e}"))?;
        if !rest.is_empty() {
            bail!("key file is corrupt: {} trailing bytes", rest.len());
        }
        kf.kdf.validate()?;
        if kf.wrapped.len() != WRAPPED_LEN || kf.meta.len() < OVERHEAD {
            bail!("key file is corrupt: wrapped key or metadata of the wrong size");
        }
        Ok(kf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(Master(Zeroizing::new([7u8; 32])))
    }

    const CHEAP: Kdf = TEST_KDF;

    #[test]
    fn seal_open_round_trip_binds_ad_and_detects_every_flip() {
        let k = keys();
        let s = k.seal(b"ad", b"hello world").unwrap();
        assert_eq!(s.len(), 11 + OVERHEAD);
        assert_eq!(k.open(b"ad", &s).unwrap(), b"hello world");
        assert!(k.open(b"da", &s).is_err());
        for i in 0..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 0x01;
            assert!(k.open(b"ad", &bad).is_err(), "flip at {i}");
        }
        // Deterministic: same input, same bytes; different input, other nonce.
        assert_eq!(k.seal(b"ad", b"hello world").unwrap(), s);
        assert_ne!(
            k.seal(b"ad", b"hello worle").unwrap()[..NONCE_LEN],
            s[..NONCE_LEN]
        );
        // Another master cannot open it.
        let other = Keys::new(Master(Zeroizing::new([8u8; 32])));
        assert!(other.open(b"ad", &s).is_err());
        assert!(k.open(b"ad", &s[..OVERHEAD - 1]).is_err());
    }

    #[test]
    fn padme_rounds_up_a_little() {
        assert_eq!(padme(0), 0);
        assert_eq!(padme(1), 1);
        assert_eq!(padme(9), 10);
        assert_eq!(padme(16 << 20), 16 << 20);
        assert_eq!(padme((16 << 20) + 1), (16 << 20) + (1 << 19));
        for n in [
            3u64,
            100,
            1000,
            12345,
            1 << 20,
            (1 << 24) + 12345,
            u32::MAX as u64,
        ] {
            let p = padme(n);
            assert!(p >= n && (p - n) as f64 <= 0.12 * n as f64, "{n} -> {p}");
            assert_eq!(padme(p), p);
        }
        let k = keys();
        assert_eq!(k.padding(b"t", 10), k.padding(b"t", 10));
        assert_ne!(k.padding(b"t", 10), k.padding(b"u", 10));
    }

    #[test]
    fn blob_ids_are_keyed() {
        let k = keys();
        assert_ne!(k.blob_id(b"x"), BlobId(Id::of(b"x")));
        assert_eq!(Crypt::Plain.blob_id(b"x"), BlobId(Id::of(b"x")));
        assert_ne!(k.name_of(b"a", b"bc"), k.name_of(b"ab", b"c"));
    }

    #[test]
    fn blob_records_are_bound_to_their_index_entry() {
        let k = keys();
        let id = k.blob_id(b"data");
        let r = seal_blob(&k, &id, 4, false, b"data").unwrap();
        assert_eq!(open_blob(&k, &id, 4, false, &r).unwrap(), b"data");
        let other = k.blob_id(b"atad");
        assert!(open_blob(&k, &other, 4, false, &r).is_err());
        assert!(open_blob(&k, &id, 5, false, &r).is_err());
        assert!(open_blob(&k, &id, 4, true, &r).is_err());
    }

    #[test]
    fn files_are_bound_to_kind_and_name() {
        let k = keys();
        let v = vec![1u32, 2, 3];
        let f = encode(&k, FileKind::Snapshot, b"name-a", &v).unwrap();
        assert_eq!(&f[..8], b"LAYBAKS\x03");
        assert_eq!(
            decode::<Vec<u32>>(&k, FileKind::Snapshot, b"name-a", &f).unwrap(),
            v
        );
        assert!(decode::<Vec<u32>>(&k, FileKind::Snapshot, b"name-b", &f).is_err());
        let mut as_index = f.clone();
        as_index[6] = b'I';
        assert!(decode::<Vec<u32>>(&k, FileKind::Index, b"name-a", &as_index).is_err());
        let plain = format::encode(FileKind::Snapshot, &v).unwrap();
        let e = decode::<Vec<u32>>(&k, FileKind::Snapshot, b"", &plain).unwrap_err();
        assert!(e.to_string().contains("not encrypted"), "{e}");
    }

    #[test]
    fn key_files_wrap_and_refuse_wrong_passwords() {
        let k = keys();
        let kf = KeyFile::wrap(&k, b"secret", CHEAP, "laybak-host-marker".into()).unwrap();
        let bytes = kf.encode().unwrap();
        let back = KeyFile::decode(&bytes).unwrap();
        let m = back.unwrap(b"secret").unwrap().expect("right password");
        assert_eq!(&m.0[..], &[7u8; 32]);
        assert!(back.unwrap(b"Secret").unwrap().is_none());
        assert_eq!(back.meta(&k).unwrap().host, "laybak-host-marker");
        // The host is not in the clear; the metadata is this repository's.
        assert!(!bytes.windows(18).any(|w| w == b"laybak-host-marker"));
        let other = Keys::new(Master(Zeroizing::new([8u8; 32])));
        assert!(back.meta(&other).is_err());
        // The parameters are authenticated with the wrapped key.
        let mut changed = back.clone();
        changed.kdf.iterations = 2;
        assert!(changed.unwrap(b"secret").unwrap().is_none());
        let mut short = back.clone();
        short.wrapped.pop();
        assert!(short.unwrap(b"secret").is_err());
        // Crafted parameters are refused before any work.
        let mut greedy = back.clone();
        greedy.kdf.memory_kib = u32::MAX;
        assert!(KeyFile::decode(&greedy.encode().unwrap()).is_err());
        assert!(KeyFile::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release --lib crypt::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn seal_and_open_throughput() {
        let k = Keys::new(Master::from_bytes([1; 32]));
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7) as u8).collect();
        let n = 256;
        let t = std::time::Instant::now();
        let mut sealed = Vec::new();
        for i in 0..n {
            sealed = k.seal(&[i as u8], &data).unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        for _ in 0..n {
            k.open(&[(n - 1) as u8], &sealed).unwrap();
        }
        let o = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(k.nonce(b"x", &data));
        }
        let h = t.elapsed().as_secs_f64();
        let mb = n as f64;
        println!(
            "seal {:.0} MiB/s, open {:.0} MiB/s, nonce hash {:.0} MiB/s",
            mb / s,
            mb / o,
            mb / h
        );
    }
}

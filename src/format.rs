//! On-disk framing shared by every repository file: a magic, a kind byte and
//! a format version, then (for metadata files) a zstd-compressed postcard
//! payload. Pure encode/decode; no I/O. See `docs/FORMAT.md`.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::fmt;
use std::io::Read;

/// First six bytes of every laybak repository file.
pub const MAGIC: &[u8; 6] = b"LAYBAK";
/// The newest repository format version this build reads (3: every file
/// of an encrypted repository, see [`crate::crypt`]; 4: a layer manifest
/// stored as pages, [`LAYER_PAGES`]).
pub const FORMAT_VERSION: u8 = 4;
/// The version every file is written with unless its content needs a newer
/// one: a repository that never needed version 2 stays readable by
/// laybak 0.1.
pub const BASE_VERSION: u8 = 1;
/// Layer manifests holding a renamed directory ([`crate::layer::DirKind::Redirect`])
/// are written with this version, so that an older laybak refuses them in
/// one line instead of misreading them.
pub const LAYER_REDIRECTS: u8 = 2;
/// Layer manifests too large for one file are written as a list of pages
/// ([`crate::layer::Pages`]) with this version, in plaintext and encrypted
/// repositories alike; every other file keeps its version.
pub const LAYER_PAGES: u8 = 4;
/// Upper bound on a decompressed metadata file (config, index, manifest,
/// snapshot), enforced while decompressing, so a crafted file cannot make
/// us allocate unbounded memory.
pub const MAX_METADATA_SIZE: u64 = 1 << 30;

/// What a repository file holds; the byte after the magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// `config`: repository identity and parameters.
    Config = b'C' as isize,
    /// `packs/xx/ID`: compressed blobs followed by their table.
    Pack = b'P' as isize,
    /// `index/ID`: which blobs live in which pack.
    Index = b'I' as isize,
    /// `layers/ID`: one layer manifest.
    Layer = b'L' as isize,
    /// `snapshots/ID`: one snapshot record.
    Snapshot = b'S' as isize,
    /// `plans/ID`: a forget in progress (snapshot rewrites and deletions).
    Plan = b'F' as isize,
    /// `locks/ID`: a repository lock.
    Lock = b'K' as isize,
    /// `keys/ID`: the master secret wrapped under one password (version 3).
    Key = b'Y' as isize,
}

impl FileKind {
    /// Human name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            FileKind::Config => "config",
            FileKind::Pack => "pack",
            FileKind::Index => "index",
            FileKind::Layer => "layer manifest",
            FileKind::Snapshot => "snapshot record",
            FileKind::Plan => "forget plan",
            FileKind::Lock => "lock",
            FileKind::Key => "key file",
        }
    }
}

/// A blake3 digest. Stored files say which kind of file an id names with
/// the typed ids below ([`BlobId`], [`PackId`], ...); a bare `Id` is for
/// code that handles every kind alike (listings, hashing).
///
/// Encoded as its 32 bytes in the binary format and as 64 hex digits in
/// human-readable ones (the JSON of volume state and `--json` output).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub [u8; 32]);

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.hex())
        } else {
            // Exactly what `#[derive(Serialize)]` on the newtype wrote.
            s.serialize_newtype_struct("Id", &self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Id, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            Id::parse(&s)
                .ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a 64-digit hex id")))
        } else {
            #[derive(Deserialize)]
            #[serde(rename = "Id")]
            struct Raw([u8; 32]);
            Ok(Id(Raw::deserialize(d)?.0))
        }
    }
}

/// Ids of one kind of thing: a newtype over [`Id`] with the same encoding,
/// so a layer id cannot be passed where a snapshot id is meant.
macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Id);

        impl $name {
            /// Lower-case hex, 64 characters.
            pub fn hex(&self) -> String {
                self.0.hex()
            }
            /// The first 8 hex characters, for human output.
            pub fn short(&self) -> String {
                self.0.short()
            }
            /// Parse a full 64-character hex id.
            pub fn parse(s: &str) -> Option<$name> {
                Id::parse(s).map($name)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.short())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.hex())
            }
        }

    };
}

/// An id that names a stored file of one kind: what the repository needs
/// to build its object name.
pub trait FileId: Copy {
    /// The kind of file it names.
    const KIND: FileKind;
    /// The digest.
    fn id(&self) -> &Id;
    /// The typed id of a digest listed under this kind.
    fn from_id(id: Id) -> Self;
}

macro_rules! file_id {
    ($name:ident, $kind:ident) => {
        impl FileId for $name {
            const KIND: FileKind = FileKind::$kind;
            fn id(&self) -> &Id {
                &self.0
            }
            fn from_id(id: Id) -> $name {
                $name(id)
            }
        }
    };
}

typed_id!(
    /// A blob: blake3 of its plaintext bytes.
    BlobId
);
typed_id!(
    /// A pack file: blake3 of its bytes.
    PackId
);
typed_id!(
    /// An index file: blake3 of its bytes.
    IndexId
);
typed_id!(
    /// A layer manifest: blake3 of its bytes.
    LayerId
);
typed_id!(
    /// A snapshot: blake3 of its record's first version.
    SnapshotId
);
typed_id!(
    /// A forget plan: blake3 of its bytes.
    PlanId
);
typed_id!(
    /// A repository lock (blake3 of who took it when).
    LockId
);
typed_id!(
    /// A key file: blake3 of its bytes.
    KeyId
);
typed_id!(
    /// A repository (blake3 of its creation time, pid and host).
    RepoId
);
file_id!(PackId, Pack);
file_id!(IndexId, Index);
file_id!(LayerId, Layer);
file_id!(SnapshotId, Snapshot);
file_id!(PlanId, Plan);
file_id!(LockId, Lock);
file_id!(KeyId, Key);

impl Id {
    /// blake3 of `data`.
    pub fn of(data: &[u8]) -> Id {
        Id(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, 64 characters.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The first 8 hex characters, for human output.
    pub fn short(&self) -> String {
        self.hex()[..8].to_string()
    }

    /// Parse a full 64-character hex id.
    pub fn parse(s: &str) -> Option<Id> {
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Id(out))
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// The 8-byte header: magic, kind, version ([`BASE_VERSION`]).
pub fn header(kind: FileKind) -> [u8; 8] {
    header_v(kind, BASE_VERSION)
}

/// The 8-byte header of a file of `kind` written with `version`.
pub fn header_v(kind: FileKind, version: u8) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..6].copy_from_slice(MAGIC);
    h[6] = kind as u8;
    h[7] = version;
    h
}

/// Check the header of `data` and return the rest.
///
/// # Errors
/// Not a laybak file, a different kind, or a newer format version.
pub fn check_header(kind: FileKind, data: &[u8]) -> Result<&[u8]> {
    if data.len() < 8 || &data[..6] != MAGIC {
        bail!("not a laybak {} (bad magic)", kind.name());
    }
    if data[6] != kind as u8 {
        bail!("not a laybak {} (kind byte {:#x})", kind.name(), data[6]);
    }
    if data[7] > FORMAT_VERSION {
        bail!(
            "{} has format version {}, this laybak reads up to {}: upgrade laybak",
            kind.name(),
            data[7],
            FORMAT_VERSION
        );
    }
    if data[7] == 0 {
        bail!("{} has invalid format version 0", kind.name());
    }
    Ok(&data[8..])
}

/// Encode a metadata value: header, then zstd(postcard(value)).
///
/// # Errors
/// Serialization or compression failure (not expected for valid values).
pub fn encode<T: Serialize>(kind: FileKind, value: &T) -> Result<Vec<u8>> {
    encode_v(kind, BASE_VERSION, value)
}

/// Encode a layer manifest with the oldest version that can hold it.
///
/// # Errors
/// As [`encode`].
pub fn encode_layer(layer: &crate::layer::Layer) -> Result<Vec<u8>> {
    let v = if layer.has_redirects() {
        LAYER_REDIRECTS
    } else {
        BASE_VERSION
    };
    encode_v(FileKind::Layer, v, layer)
}

/// Encode the list of pages of a layer manifest too large for one file.
///
/// # Errors
/// As [`encode`].
pub fn encode_pages(pages: &crate::layer::Pages) -> Result<Vec<u8>> {
    encode_v(FileKind::Layer, LAYER_PAGES, pages)
}

/// Decode the list of pages of a plaintext paged layer file (version
/// [`LAYER_PAGES`]).
///
/// # Errors
/// Wrong header or version, or a corrupt payload.
pub fn decode_pages(data: &[u8]) -> Result<crate::layer::Pages> {
    let body = check_header(FileKind::Layer, data)?;
    if data[7] != LAYER_PAGES {
        bail!(
            "layer manifest of format version {} is not a list of pages",
            data[7]
        );
    }
    decode_payload(FileKind::Layer, body)
}

/// Decode and validate a whole layer manifest; a version 1 manifest
/// cannot hold a renamed directory.
///
/// # Errors
/// As [`decode`], or an invalid layer.
pub fn decode_layer(data: &[u8]) -> Result<crate::layer::Layer> {
    let layer: crate::layer::Layer = decode(FileKind::Layer, data)?;
    layer.validate()?;
    if data[7] < LAYER_REDIRECTS && layer.has_redirects() {
        bail!(
            "layer manifest of format version {} holds a renamed directory, which needs version {LAYER_REDIRECTS}: it is corrupt",
            data[7]
        );
    }
    Ok(layer)
}

fn encode_v<T: Serialize>(kind: FileKind, version: u8, value: &T) -> Result<Vec<u8>> {
    let mut out = header_v(kind, version).to_vec();
    out.extend_from_slice(&compress_payload(value)?);
    Ok(out)
}

/// The payload of a metadata file: zstd (level 3, content checksum on) of
/// postcard(value).
///
/// # Errors
/// Serialization or compression failure.
pub fn compress_payload<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let raw = postcard::to_stdvec(value).context("serializing")?;
    let mut c = zstd::bulk::Compressor::new(3).context("zstd")?;
    c.include_checksum(true).context("zstd")?;
    c.compress(&raw).context("compressing")
}

/// Decode a payload made by [`compress_payload`], bounding its size and
/// requiring that postcard consumes it exactly.
///
/// # Errors
/// Corrupt compression, oversize, or not a valid encoding of `T`.
pub fn decode_payload<T: DeserializeOwned>(kind: FileKind, z: &[u8]) -> Result<T> {
    let raw = decompress_bounded(z, MAX_METADATA_SIZE)
        .with_context(|| format!("{} is corrupt", kind.name()))?;
    let (value, rest) = postcard::take_from_bytes::<T>(&raw)
        .map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", kind.name()))?;
    if !rest.is_empty() {
        bail!("{} is corrupt: {} trailing bytes", kind.name(), rest.len());
    }
    Ok(value)
}

/// Decode a metadata value written by [`encode`], bounding its size.
///
/// # Errors
/// Wrong header, corrupt compression, oversize payload, or a payload that is
/// not a valid encoding of `T`.
pub fn decode<T: DeserializeOwned>(kind: FileKind, data: &[u8]) -> Result<T> {
    let body = check_header(kind, data)?;
    if data[7] == LAYER_PAGES {
        bail!(
            "{} has format version {LAYER_PAGES}, which only paged layer manifests use: it is corrupt",
            kind.name()
        );
    }
    if data[7] >= crate::crypt::ENCRYPTED {
        bail!(
            "{} is encrypted (format version {}) in a plaintext repository: it is damaged or was put there by someone else",
            kind.name(),
            data[7]
        );
    }
    decode_payload(kind, body)
}

/// Encode a metadata value that may be rewritten in place under a fixed
/// name (snapshot records): header, blake3 of the rest, then
/// zstd(postcard(value)). The embedded hash verifies it on read.
///
/// # Errors
/// As [`encode`].
pub fn encode_sealed<T: Serialize>(kind: FileKind, value: &T) -> Result<Vec<u8>> {
    let plain = encode(kind, value)?;
    let mut out = plain[..8].to_vec();
    out.extend_from_slice(blake3::hash(&plain[8..]).as_bytes());
    out.extend_from_slice(&plain[8..]);
    Ok(out)
}

/// Decode a value written by [`encode_sealed`], verifying its hash.
///
/// # Errors
/// Wrong header, hash mismatch, or a corrupt payload.
pub fn decode_sealed<T: DeserializeOwned>(kind: FileKind, data: &[u8]) -> Result<T> {
    let body = check_header(kind, data)?;
    if body.len() < 32 {
        bail!("{} is truncated", kind.name());
    }
    if blake3::hash(&body[32..]).as_bytes() != &body[..32] {
        bail!("{} is corrupt (blake3 mismatch)", kind.name());
    }
    let mut plain = data[..8].to_vec();
    plain.extend_from_slice(&body[32..]);
    decode(kind, &plain)
}

/// zstd-decompress `data`, failing if the output would exceed `limit` bytes.
///
/// # Errors
/// Corrupt input or output larger than `limit`.
pub fn decompress_bounded(data: &[u8], limit: u64) -> Result<Vec<u8>> {
    let dec = zstd::stream::read::Decoder::new(data).context("zstd")?;
    let mut out = Vec::new();
    dec.take(limit + 1)
        .read_to_end(&mut out)
        .context("zstd stream")?;
    if out.len() as u64 > limit {
        bail!("decompressed size exceeds {limit} bytes");
    }
    Ok(out)
}

/// A point in time: seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Time {
    /// Seconds since 1970-01-01T00:00:00Z (negative before).
    pub secs: i64,
    /// Nanoseconds, `0..1_000_000_000`.
    pub nanos: u32,
}

impl Time {
    /// The current wall-clock time.
    pub fn now() -> Time {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        }
    }

    /// RFC 3339 in UTC, with nanoseconds.
    pub fn rfc3339(&self) -> String {
        // humantime formats years 1970..=9999 only (it panics beyond).
        if !(0..=253_402_300_799).contains(&self.secs) {
            return format!("{}.{:09}s-since-epoch", self.secs, self.nanos);
        }
        let t = std::time::UNIX_EPOCH
            + std::time::Duration::new(self.secs as u64, self.nanos.min(999_999_999));
        humantime::format_rfc3339_nanos(t).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hex_round_trip() {
        let id = Id::of(b"hello");
        assert_eq!(Id::parse(&id.hex()), Some(id));
        assert_eq!(Id::parse("zz"), None);
        assert_eq!(Id::parse(&"g".repeat(64)), None);
        assert_eq!(Id::parse(&id.hex().to_uppercase()), None);
        assert_eq!(Id::parse(&format!("+{}", &id.hex()[1..])), None);
    }

    #[test]
    fn encode_decode_round_trip_and_header_checks() {
        let v: Vec<(u32, String)> = vec![(1, "a".into()), (2, "bé".into())];
        let enc = encode(FileKind::Index, &v).unwrap();
        let back: Vec<(u32, String)> = decode(FileKind::Index, &enc).unwrap();
        assert_eq!(back, v);
        assert!(decode::<Vec<(u32, String)>>(FileKind::Layer, &enc).is_err());
        let mut newer = enc.clone();
        newer[7] = FORMAT_VERSION + 1;
        let err = decode::<Vec<(u32, String)>>(FileKind::Index, &newer).unwrap_err();
        assert!(err.to_string().contains("upgrade laybak"), "{err}");
        let mut flipped = enc.clone();
        let n = flipped.len();
        flipped[n - 3] ^= 0xff;
        assert!(decode::<Vec<(u32, String)>>(FileKind::Index, &flipped).is_err());
    }

    #[test]
    fn sealed_round_trip_detects_flips() {
        let v = vec![1u64, 2, 3];
        let enc = encode_sealed(FileKind::Snapshot, &v).unwrap();
        assert_eq!(
            decode_sealed::<Vec<u64>>(FileKind::Snapshot, &enc).unwrap(),
            v
        );
        for i in 8..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x10;
            assert!(
                decode_sealed::<Vec<u64>>(FileKind::Snapshot, &bad).is_err(),
                "flip at {i}"
            );
        }
    }

    #[test]
    fn decompress_is_bounded() {
        let big = vec![0u8; 1 << 20];
        let z = zstd::bulk::compress(&big, 3).unwrap();
        assert!(decompress_bounded(&z, 1000).is_err());
        assert_eq!(decompress_bounded(&z, 1 << 20).unwrap().len(), 1 << 20);
    }

    #[test]
    fn rfc3339() {
        let t = Time { secs: 0, nanos: 5 };
        assert_eq!(t.rfc3339(), "1970-01-01T00:00:00.000000005Z");
        // Out of RFC 3339's range (found by fuzzing): no panic.
        assert!(
            Time {
                secs: 253_402_300_800,
                nanos: 0
            }
            .rfc3339()
            .contains("since-epoch")
        );
        assert!(
            Time {
                secs: i64::MIN,
                nanos: 2_000_000_000
            }
            .rfc3339()
            .contains("since-epoch")
        );
    }
}

//! Shared checks for the laybak fuzz targets.
//!
//! Each `check_*` function takes the bytes of one repository file, runs the
//! same decoding a reader runs, and asserts the properties the decoders
//! promise (never panic, bounded allocation, documented invariants). The
//! `*_postcard` targets feed raw postcard payloads through [`wrap`] so the
//! fuzzer explores the postcard structure instead of the zstd framing.

use laybak::format::Time;
use laybak::format::{self, FileKind};
use laybak::layer::{self, Layer, Node};
use laybak::lock::LockInfo;
use laybak::reclaim::{self, Plan, Policy};
use laybak::repo::{self, Config, IndexPack, Snapshot};
use serde::{Serialize, de::DeserializeOwned};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// A plaintext repository in memory: the pack decoders are its methods.
fn plain_repo() -> &'static repo::Repo {
    static R: OnceLock<repo::Repo> = OnceLock::new();
    R.get_or_init(|| {
        repo::Repo::create(
            std::path::Path::new("memory"),
            Arc::new(laybak::backend::testing::Memory::new()),
            &repo::Protection::Plaintext,
        )
        .expect("memory repo")
    })
}

/// An encrypted repository in memory (the fuzz key: cheap KDF).
fn sealed_repo() -> &'static repo::Repo {
    static R: OnceLock<repo::Repo> = OnceLock::new();
    R.get_or_init(|| {
        repo::Repo::create(
            std::path::Path::new("memory"),
            Arc::new(laybak::backend::testing::Memory::new()),
            &repo::Protection::test("fuzz"),
        )
        .expect("memory repo")
    })
}

fn keys() -> &'static laybak::crypt::Keys {
    static K: OnceLock<laybak::crypt::Keys> = OnceLock::new();
    K.get_or_init(|| laybak::crypt::Keys::new(laybak::crypt::Master::from_bytes([0x5a; 32])))
}

/// Kinds a sealed metadata file can be, by the fuzz input's first byte.
const SEALED_KINDS: [FileKind; 6] = [
    FileKind::Config,
    FileKind::Index,
    FileKind::Layer,
    FileKind::Snapshot,
    FileKind::Plan,
    FileKind::Lock,
];

/// A version 3 file: the first byte picks the kind, the rest is read both
/// as the whole file (authentication must refuse it, never panic) and as
/// the payload of a file the harness seals with the fuzz key (so the
/// fuzzer reaches the decoders behind authentication).
pub fn check_sealed(data: &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let kind = SEALED_KINDS[k as usize % SEALED_KINDS.len()];
    let bind = [k; 32];
    let z = COMPRESSOR.with(|c| c.borrow_mut().compress(rest).expect("zstd compress"));
    let mut file = format::header_v(kind, laybak::crypt::ENCRYPTED).to_vec();
    let mut ad = file.clone();
    ad.extend_from_slice(&bind);
    file.extend_from_slice(&keys().seal(&ad, &z).expect("seal"));
    for (input, must_open) in [(rest, false), (&file[..], true)] {
        let r = match kind {
            FileKind::Config => decode3::<Config>(kind, &bind, input),
            FileKind::Index => decode3::<Vec<IndexPack>>(kind, &bind, input),
            FileKind::Layer => {
                laybak::crypt::decode::<Layer>(keys(), kind, &bind, input).map(|l| {
                    if l.validate().is_ok() {
                        let view = layer::restack(std::slice::from_ref(&l));
                        check_view(std::slice::from_ref(&l), &view);
                    }
                })
            }
            FileKind::Snapshot => laybak::crypt::decode::<Snapshot>(keys(), kind, &bind, input)
                .map(|s| use_snapshot(&s)),
            FileKind::Plan => decode3::<Plan>(kind, &bind, input),
            _ => decode3::<LockInfo>(kind, &bind, input),
        };
        if let Err(e) = r
            && must_open
        {
            assert!(
                !e.to_string().contains("failed authentication"),
                "a file sealed with the key failed authentication: {e}"
            );
        }
    }
}

fn decode3<T: Serialize + DeserializeOwned + std::fmt::Debug>(
    kind: FileKind,
    bind: &[u8],
    data: &[u8],
) -> anyhow::Result<()> {
    let v: T = laybak::crypt::decode(keys(), kind, bind, data)?;
    let _ = format!("{v:?}");
    let again = laybak::crypt::encode(keys(), kind, bind, &v).expect("re-encodes");
    let back: T = laybak::crypt::decode(keys(), kind, bind, &again).expect("decodes");
    assert_eq!(
        postcard::to_stdvec(&back).expect("serializes"),
        postcard::to_stdvec(&v).expect("serializes")
    );
    Ok(())
}

/// `keys/ID`: parse; parameters cheap enough are also run, with a wrong
/// password (never a panic, never a master key).
pub fn check_key_file(data: &[u8]) {
    let Ok(kf) = laybak::crypt::KeyFile::decode(data) else {
        return;
    };
    let again = laybak::crypt::KeyFile::decode(&kf.encode().expect("re-encodes")).expect("decodes");
    assert_eq!(again.salt, kf.salt);
    assert!(kf.meta(keys()).is_err(), "fuzzed key metadata opened");
    if kf.kdf.memory_kib <= 256 && kf.kdf.iterations <= 2 {
        let r = kf
            .unwrap(b"not the password")
            .expect("valid parameters derive");
        assert!(r.is_none(), "a fuzzed key file opened");
    }
}

/// A version 3 pack framed like [`frame_pack`] (as a fuzzed file, and
/// with its table and length field sealed as laybak seals them, blob
/// records left as fuzzed): parse, then decode every blob.
pub fn check_sealed_pack(data: &[u8]) {
    let repo = sealed_repo();
    let mut p = frame_pack(data);
    p[7] = laybak::crypt::ENCRYPTED;
    check_pack_with(repo, &p);
    let n = p.len();
    let tl = u32::from_le_bytes(p[n - 12..n - 8].try_into().expect("4")) as usize;
    let table = p[n - 12 - tl..n - 12].to_vec();
    if let Some(k) = repo_keys(repo) {
        let sealed = k
            .seal(&laybak::crypt::pack_table_ad(&p[..8]), &table)
            .expect("seal");
        let field = k
            .seal(
                &laybak::crypt::pack_trailer_ad(
                    &p[..8],
                    &sealed[sealed.len() - laybak::crypt::TAG_LEN..],
                ),
                &(sealed.len() as u32).to_le_bytes(),
            )
            .expect("seal");
        let mut q = p[..n - 12 - tl].to_vec();
        q.extend_from_slice(&sealed);
        q.extend_from_slice(&field);
        q.extend_from_slice(repo::PACK_TAIL);
        check_pack_with(repo, &q);
    }
}

fn repo_keys(repo: &repo::Repo) -> Option<&laybak::crypt::Keys> {
    repo.crypt().keys()
}

thread_local! {
    static COMPRESSOR: RefCell<zstd::bulk::Compressor<'static>> = RefCell::new({
        let mut c = zstd::bulk::Compressor::new(1).expect("zstd compressor");
        c.include_checksum(true).expect("zstd checksum");
        c
    });
}

/// Frame a raw payload as a metadata file of `kind`: header, then a zstd
/// frame with checksum (what `format::encode` writes, at a faster level).
pub fn wrap(kind: FileKind, payload: &[u8]) -> Vec<u8> {
    let mut out = format::header(kind).to_vec();
    let z = COMPRESSOR.with(|c| c.borrow_mut().compress(payload).expect("zstd compress"));
    out.extend_from_slice(&z);
    out
}

/// A decoded value must re-encode, and decoding that must give back the
/// same canonical bytes.
fn round_trip<T: Serialize + DeserializeOwned>(kind: FileKind, v: &T) {
    let canon = postcard::to_stdvec(v).expect("a decoded value re-serializes");
    let enc = format::encode(kind, v).expect("a decoded value re-encodes");
    let back: T = format::decode(kind, &enc).expect("an encoded value decodes");
    assert_eq!(
        postcard::to_stdvec(&back).expect("re-serializes"),
        canon,
        "{} does not round-trip",
        kind.name()
    );
}

/// `config`.
pub fn check_config(data: &[u8]) {
    if let Ok(c) = format::decode::<Config>(FileKind::Config, data) {
        let _ = format!("{c:?}");
        round_trip(FileKind::Config, &c);
    }
}

/// `index/ID`.
pub fn check_index(data: &[u8]) {
    if let Ok(packs) = format::decode::<Vec<IndexPack>>(FileKind::Index, data) {
        let _ = format!("{packs:?}");
        round_trip(FileKind::Index, &packs);
    }
}

/// `snapshots/ID`. Records are sealed (header, blake3 of the rest, zstd
/// frame; `format::decode_sealed`). A fuzzer cannot forge the hash, so the
/// body after it is also decoded directly, and so is the whole file as a
/// plain metadata file (`format::decode`).
pub fn check_snapshot(data: &[u8]) {
    if let Ok(s) = format::decode_sealed::<Snapshot>(FileKind::Snapshot, data) {
        use_snapshot(&s);
    }
    if let Ok(s) = format::decode::<Snapshot>(FileKind::Snapshot, data) {
        use_snapshot(&s);
    }
    if data.len() >= 8 + 32 {
        let mut plain = data[..8].to_vec();
        plain.extend_from_slice(&data[8 + 32..]);
        if let Ok(s) = format::decode::<Snapshot>(FileKind::Snapshot, &plain) {
            use_snapshot(&s);
        }
    }
}

/// A raw postcard snapshot payload, framed both ways.
pub fn check_snapshot_payload(payload: &[u8]) {
    let plain = wrap(FileKind::Snapshot, payload);
    let plain_ok = format::decode::<Snapshot>(FileKind::Snapshot, &plain).map(|s| use_snapshot(&s));
    let mut sealed = plain[..8].to_vec();
    sealed.extend_from_slice(laybak::format::Id::of(&plain[8..]).0.as_slice());
    sealed.extend_from_slice(&plain[8..]);
    let sealed_ok =
        format::decode_sealed::<Snapshot>(FileKind::Snapshot, &sealed).map(|s| use_snapshot(&s));
    assert_eq!(
        plain_ok.is_ok(),
        sealed_ok.is_ok(),
        "sealed and plain decoding disagree"
    );
}

/// What readers do with a decoded record: `laybak snapshots` prints the
/// time as RFC 3339 and short ids. Then re-encode it.
fn use_snapshot(s: &Snapshot) {
    let _ = format!("{s:?}");
    let _ = s.time.rfc3339();
    let _ = s.parent.map(|p| p.short());
    for l in &s.layers {
        let _ = l.short();
    }
    round_trip(FileKind::Snapshot, s);
    let enc = format::encode_sealed(FileKind::Snapshot, s).expect("a decoded record re-seals");
    let back: Snapshot =
        format::decode_sealed(FileKind::Snapshot, &enc).expect("a sealed record decodes");
    assert_eq!(
        postcard::to_stdvec(&back).expect("re-serializes"),
        postcard::to_stdvec(s).expect("re-serializes"),
        "sealed snapshot record does not round-trip"
    );
}

/// A raw postcard payload read as a forget plan (`plans/ID`) and as a lock
/// file (`locks/ID`).
pub fn check_plan_lock_payload(payload: &[u8]) {
    if let Ok(p) = format::decode::<Plan>(FileKind::Plan, &wrap(FileKind::Plan, payload)) {
        let _ = format!("{p:?}");
        round_trip(FileKind::Plan, &p);
    }
    if let Ok(l) = format::decode::<LockInfo>(FileKind::Lock, &wrap(FileKind::Lock, payload)) {
        let _ = format!("{l:?}");
        round_trip(FileKind::Lock, &l);
    }
}

/// `layers/ID`: decode, validate, and restack a valid layer alone.
pub fn check_layer(data: &[u8]) {
    let Ok(l) = format::decode::<Layer>(FileKind::Layer, data) else {
        return;
    };
    round_trip(FileKind::Layer, &l);
    // The checked decoder: valid, and a redirect only in version 2.
    let Ok(l) = format::decode_layer(data) else {
        return;
    };
    let view = layer::restack(std::slice::from_ref(&l));
    check_view(std::slice::from_ref(&l), &view);
}

/// A chain of validated layers, bottom first.
pub fn check_chain(layers: &[Layer]) {
    let valid: Vec<Layer> = layers
        .iter()
        .filter(|l| l.validate().is_ok())
        .cloned()
        .collect();
    if valid.is_empty() {
        return;
    }
    let view = layer::restack(&valid);
    check_view(&valid, &view);
    // A bottom squash is the merged view itself: same paths, nodes (a
    // directory's kind aside) and metadata.
    let flat = layer::squash(&valid, true);
    assert!(flat.validate().is_ok(), "bottom squash is invalid");
    assert!(!flat.has_redirects(), "bottom squash has a redirect");
    let again = layer::restack(std::slice::from_ref(&flat));
    let shape = |v: &layer::View<'_>| -> Vec<(Vec<u8>, char, layer::Meta)> {
        v.iter()
            .map(|(k, m)| (k.clone(), m.entry.node.letter(), m.entry.meta.clone()))
            .collect()
    };
    assert_eq!(
        shape(&view),
        shape(&again),
        "bottom squash changes the view"
    );
}

/// The invariants `restack` documents for validated layers (FORMAT.md §5):
/// no whiteouts in the result, every entry's parent present as a directory,
/// each path owned by the topmost layer that lists it, and everything the
/// top layer lists (bar whiteouts) visible.
pub fn check_view(chain: &[Layer], view: &layer::View<'_>) {
    // Without renamed directories a path belongs to the topmost layer that
    // lists it; with them, content comes from where the redirect points.
    let renamed = chain.iter().any(Layer::has_redirects);
    let mut top: HashMap<&[u8], usize> = HashMap::new();
    for (i, l) in chain.iter().enumerate() {
        for e in &l.entries {
            top.insert(&e.path, i);
        }
    }
    let root = view.get(&b""[..]).expect("restack result has no root");
    assert!(root.entry.node.is_dir(), "restack root is not a directory");
    for (path, m) in view {
        assert_eq!(path, &m.entry.path, "view key differs from entry path");
        assert!(
            m.layer < chain.len(),
            "view entry from a layer out of range"
        );
        assert!(
            m.entry.node != Node::Whiteout,
            "whiteout in restack result at {}",
            layer::show(path)
        );
        if !renamed {
            assert_eq!(
                top.get(path.as_slice()),
                Some(&m.layer),
                "{} is not owned by the topmost layer listing it",
                layer::show(path)
            );
        }
        if !path.is_empty() {
            let p = layer::parent(path);
            let pm = view.get(p).unwrap_or_else(|| {
                panic!(
                    "restack result has {} without its parent",
                    layer::show(path)
                )
            });
            assert!(
                pm.entry.node.is_dir(),
                "restack result has {} under a non-directory",
                layer::show(path)
            );
        }
    }
    let last = chain.len() - 1;
    for e in &chain[last].entries {
        if e.node != Node::Whiteout {
            let m = view.get(&e.path).unwrap_or_else(|| {
                panic!(
                    "top layer entry {} missing from restack result",
                    layer::show(&e.path)
                )
            });
            assert_eq!(m.layer, last);
        }
    }
}

/// `packs/xx/ID`: parse the trailer, then decode every blob it lists.
pub fn check_pack(data: &[u8]) {
    check_pack_with(plain_repo(), data);
}

fn check_pack_with(repo: &repo::Repo, data: &[u8]) {
    let Ok(blobs) = repo.parse_pack_tail(data) else {
        return;
    };
    for b in &blobs {
        let start = b.offset;
        let end = start.checked_add(b.len as u64);
        let slice = end
            .filter(|&e| start >= 8 && e <= data.len() as u64)
            .map(|e| &data[start as usize..e as usize]);
        let Some(slice) = slice else {
            panic!("parse_pack_tail accepted a blob outside the pack: {b:?}");
        };
        if let Ok(out) = repo.decode_blob(b, slice.to_vec()) {
            assert_eq!(out.len(), b.raw_len as usize);
        }
    }
}

/// Build a pack around arbitrary bytes so the trailer framing is always
/// right: the first two bytes pick how much of the rest is the table.
pub fn frame_pack(data: &[u8]) -> Vec<u8> {
    let (tl, rest) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, rest),
        _ => (0, data),
    };
    let tl = if rest.is_empty() {
        0
    } else {
        tl % (rest.len() + 1)
    };
    let (blobs, table) = rest.split_at(rest.len() - tl);
    let mut out = format::header(FileKind::Pack).to_vec();
    out.extend_from_slice(blobs);
    out.extend_from_slice(table);
    out.extend_from_slice(&(table.len() as u32).to_le_bytes());
    out.extend_from_slice(repo::PACK_TAIL);
    out
}

/// `forget`'s retention decision on snapshot times and tags as decoded
/// from records: postcard `(Policy, Vec<(Time, Vec<String>)>)`, at most 64
/// snapshots.
pub fn check_retention(data: &[u8]) {
    type Input = (Policy, Vec<(Time, Vec<String>)>);
    let Ok(((policy, snaps), _)) = postcard::take_from_bytes::<Input>(data) else {
        return;
    };
    if snaps.len() > 64 {
        return;
    }
    let kept = reclaim::keep(&policy, &snaps);
    assert!(
        kept.iter().all(|&i| i < snaps.len()),
        "kept index out of range"
    );
    let Some(newest) = snaps.iter().map(|s| s.0).max() else {
        assert!(kept.is_empty());
        return;
    };
    assert!(
        kept.iter().any(|&i| snaps[i].0 == newest),
        "the newest snapshot is not kept"
    );
    if policy.last >= snaps.len() {
        assert_eq!(
            kept.len(),
            snaps.len(),
            "keep-last {} dropped one",
            policy.last
        );
    }
    for (i, (t, tags)) in snaps.iter().enumerate() {
        if tags.iter().any(|t| policy.tags.contains(t)) {
            assert!(kept.contains(&i), "a snapshot with a kept tag is dropped");
        }
        if let Some(w) = policy.within_secs {
            if i128::from(newest.secs) - i128::from(t.secs) <= i128::from(w) {
                assert!(
                    kept.contains(&i),
                    "a snapshot within {w} s of the newest is dropped"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The committed seeds must reach past the decoders, or the fuzzers start
    //! from nothing useful. `cargo test --manifest-path fuzz/Cargo.toml --lib`.
    use super::*;
    use std::path::Path;

    fn seeds(target: &str) -> Vec<Vec<u8>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(target);
        let mut paths: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!paths.is_empty(), "no seeds in {}", dir.display());
        paths.sort();
        paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    #[test]
    fn sealed_seeds_open_and_key_seeds_parse() {
        for raw in seeds("sealed") {
            let (&k, rest) = raw.split_first().unwrap();
            let kind = SEALED_KINDS[k as usize % SEALED_KINDS.len()];
            let z = COMPRESSOR.with(|c| c.borrow_mut().compress(rest).unwrap());
            let mut file = format::header_v(kind, laybak::crypt::ENCRYPTED).to_vec();
            let mut ad = file.clone();
            ad.extend_from_slice(&[k; 32]);
            file.extend_from_slice(&keys().seal(&ad, &z).unwrap());
            let ok = match kind {
                FileKind::Config => decode3::<Config>(kind, &[k; 32], &file).is_ok(),
                FileKind::Index => decode3::<Vec<IndexPack>>(kind, &[k; 32], &file).is_ok(),
                FileKind::Layer => decode3::<Layer>(kind, &[k; 32], &file).is_ok(),
                FileKind::Snapshot => decode3::<Snapshot>(kind, &[k; 32], &file).is_ok(),
                FileKind::Plan => decode3::<Plan>(kind, &[k; 32], &file).is_ok(),
                _ => decode3::<LockInfo>(kind, &[k; 32], &file).is_ok(),
            };
            assert!(ok, "a {} seed does not decode", kind.name());
        }
        for raw in seeds("key_file") {
            laybak::crypt::KeyFile::decode(&raw).unwrap();
        }
        assert!(!seeds("pack_sealed").is_empty());
    }

    #[test]
    fn seeds_decode() {
        for (kind, k) in [
            (FileKind::Config, "config"),
            (FileKind::Index, "index"),
            (FileKind::Layer, "layer"),
            (FileKind::Snapshot, "snapshot"),
        ] {
            for (file, raw) in seeds(k).iter().zip(seeds(&format!("{k}_postcard"))) {
                match kind {
                    FileKind::Config => {
                        format::decode::<Config>(kind, file).unwrap();
                        format::decode::<Config>(kind, &wrap(kind, &raw)).unwrap();
                    }
                    FileKind::Index => {
                        format::decode::<Vec<IndexPack>>(kind, file).unwrap();
                        format::decode::<Vec<IndexPack>>(kind, &wrap(kind, &raw)).unwrap();
                    }
                    FileKind::Layer => {
                        let l: Layer = format::decode(kind, file).unwrap();
                        l.validate().unwrap();
                        let l2: Layer = format::decode(kind, &wrap(kind, &raw)).unwrap();
                        assert_eq!(l, l2);
                    }
                    _ => {
                        format::decode_sealed::<Snapshot>(kind, file).unwrap();
                        format::decode::<Snapshot>(kind, &wrap(kind, &raw)).unwrap();
                    }
                }
            }
        }
        for (file, framed) in seeds("pack").iter().zip(seeds("pack_framed")) {
            assert_eq!(file, &frame_pack(&framed));
            let blobs = plain_repo().parse_pack_tail(file).unwrap();
            assert!(!blobs.is_empty());
            for b in blobs {
                let s = &file[b.offset as usize..(b.offset + b.len as u64) as usize];
                plain_repo().decode_blob(&b, s.to_vec()).unwrap();
            }
            check_pack(file);
        }
        let pl = seeds("plan_lock_postcard");
        let lock: LockInfo = format::decode(FileKind::Lock, &wrap(FileKind::Lock, &pl[0])).unwrap();
        assert_eq!(lock.what, "snapshot");
        let plan: Plan = format::decode(FileKind::Plan, &wrap(FileKind::Plan, &pl[1])).unwrap();
        assert_eq!((plan.rewrite.len(), plan.delete.len()), (1, 1));
        let r = &seeds("retention")[0];
        let ((policy, snaps), _) =
            postcard::take_from_bytes::<(Policy, Vec<(Time, Vec<String>)>)>(r).unwrap();
        assert_eq!((policy.tags.len(), snaps.len()), (1, 3));
        check_retention(r);
        for chain in seeds("restack_chain") {
            let (layers, rest) = postcard::take_from_bytes::<Vec<Layer>>(&chain).unwrap();
            assert!(rest.is_empty() && !layers.is_empty());
            check_chain(&layers);
        }
    }
}

/// A paged layer manifest (format version 4) in a fresh in-memory
/// repository, plaintext or encrypted by the first byte. The rest, split
/// at 0xFE bytes, is: the first part as a raw `Pages` payload (the list
/// decoder and its checks), the other parts as page bodies stored as
/// blobs, with a list the harness derives from them (so the fuzzer reaches
/// the page decoder and the cross-checks behind valid blob ids).
pub fn check_repo_pages(data: &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let protection = if k & 1 == 0 {
        repo::Protection::Plaintext
    } else {
        repo::Protection::test("fuzz")
    };
    let repo = repo::Repo::create(
        std::path::Path::new("memory"),
        Arc::new(laybak::backend::testing::Memory::new()),
        &protection,
    )
    .expect("memory repo");
    let mut parts = rest.split(|&b| b == 0xFE);
    let raw_list = parts.next().unwrap_or_default();
    let packer = repo::Packer::new(&repo);
    let mut list = layer::Pages {
        entries: 0,
        pages: Vec::new(),
    };
    for body in parts {
        let blob = repo.blob_id(body);
        packer.add(blob, body).expect("memory write");
        // The count and first path the page would have if it decodes.
        let (entries, first) = match postcard::take_from_bytes::<Vec<layer::Entry>>(body) {
            Ok((v, _)) => (v.len() as u32, v.first().map(|e| e.path.clone())),
            Err(_) => (1, None),
        };
        list.entries += u64::from(entries) + u64::from(k >> 7);
        list.pages.push(layer::PageRef {
            blob,
            entries,
            first: first.unwrap_or_default(),
        });
    }
    packer.finish().expect("memory write");
    let encode = |payload: &[u8]| -> Vec<u8> {
        let z = COMPRESSOR.with(|c| c.borrow_mut().compress(payload).expect("zstd compress"));
        let h = format::header_v(FileKind::Layer, format::LAYER_PAGES);
        let mut file = h.to_vec();
        match repo.crypt().keys() {
            None => file.extend_from_slice(&z),
            Some(keys) => file.extend_from_slice(&keys.seal(&h, &z).expect("seal")),
        }
        file
    };
    let derived = postcard::to_stdvec(&list).expect("serialize");
    for file in [encode(raw_list), encode(&derived)] {
        let id = format::LayerId(repo.write_file(FileKind::Layer, file).expect("memory write"));
        if let Ok((l, pages)) = repo.read_layer_parts(&id) {
            assert!(l.validate().is_ok());
            assert!(pages.iter().all(|p| repo.read_blob(p).is_ok()));
            // What was accepted is written back the way a writer would.
            repo.write_layer(&l).expect("memory write");
        }
    }
}

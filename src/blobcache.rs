//! A local, on-disk set of the blob ids the repository holds, so a snapshot
//! can skip blobs the repository already has without loading the whole
//! index into memory: memory stays bounded by the change, not the tree.
//!
//! The file (`STATE/cache/index-<repo id>/ids`) is a 512 KiB fanout table
//! (for every 16-bit prefix, where its ids start) followed by the sorted
//! ids; a lookup reads one small bucket. `covers` lists the index files it
//! was built from. Index files are immutable, so when the repository only
//! gained index files their ids are read into memory (they hold only recent
//! changes) and merged into the file once they exceed an eighth of it; when
//! any index file it covers is gone (prune, repair) it is rebuilt. A
//! snapshot's cost therefore follows the change, not the repository. It is a
//! cache: deleting it is safe.

use crate::format::{BlobId, Id, IndexId};
use crate::repo::Repo;
use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"LBIDS\0\0\x01";
const BUCKETS: usize = 1 << 16;
const HEADER: u64 = 8 + (BUCKETS as u64 + 1) * 8;

/// An open blob-id set: the sorted file, plus the ids of index files newer
/// than it, held in memory until they are worth merging.
pub struct BlobCache {
    file: File,
    fanout: Vec<u64>,
    recent: Vec<Id>,
}

fn bucket(id: &Id) -> usize {
    (id.0[0] as usize) << 8 | id.0[1] as usize
}

fn read_ids(path: &Path) -> Result<impl Iterator<Item = Result<Id>>> {
    let mut r = BufReader::new(File::open(path)?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        bail!("blob cache {} has a bad header", path.display());
    }
    r.seek(SeekFrom::Start(HEADER))?;
    Ok(std::iter::from_fn(move || {
        let mut b = [0u8; 32];
        match r.read_exact(&mut b) {
            Ok(()) => Some(Ok(Id(b))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
            Err(e) => Some(Err(e.into())),
        }
    }))
}

/// Write sorted, deduplicated `ids` as a cache file at `path` (atomically).
fn write_ids(path: &Path, ids: impl Iterator<Item = Result<Id>>) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut counts = vec![0u64; BUCKETS];
    {
        let f = File::create(&tmp)?;
        let mut w = BufWriter::new(&f);
        w.write_all(MAGIC)?;
        w.write_all(&vec![0u8; (HEADER - 8) as usize])?;
        let mut last: Option<Id> = None;
        for id in ids {
            let id = id?;
            if last.is_some_and(|l| l >= id) {
                if last == Some(id) {
                    continue;
                }
                bail!("internal error: blob ids not sorted");
            }
            counts[bucket(&id)] += 1;
            w.write_all(&id.0)?;
            last = Some(id);
        }
        w.flush()?;
        drop(w);
        let mut fanout = Vec::with_capacity((BUCKETS + 1) * 8);
        let mut at = 0u64;
        for c in &counts {
            fanout.extend_from_slice(&at.to_le_bytes());
            at += c;
        }
        fanout.extend_from_slice(&at.to_le_bytes());
        f.write_all_at(&fanout, 8)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Open a cache file and check it is whole: magic, a non-decreasing
/// fanout, and exactly as many ids as the fanout says.
fn load(path: &Path) -> Result<(File, Vec<u64>)> {
    let file = File::open(path)?;
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0)?;
    let mut raw = vec![0u8; (HEADER - 8) as usize];
    file.read_exact_at(&mut raw, 8)?;
    let fanout: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let n = *fanout.last().expect("non-empty");
    if &magic != MAGIC
        || fanout.windows(2).any(|w| w[0] > w[1])
        || file.metadata()?.len() != HEADER + n * 32
    {
        bail!("blob cache {} is damaged", path.display());
    }
    Ok((file, fanout))
}

fn write_covers(path: &Path, listed: &BTreeSet<Id>) -> Result<()> {
    let text: String = listed.iter().map(|i| i.hex() + "\n").collect();
    crate::backend::atomic_write(path, text.as_bytes(), 0)?;
    Ok(())
}

/// Merge two sorted id streams.
fn merge(
    a: impl Iterator<Item = Result<Id>>,
    b: impl Iterator<Item = Result<Id>>,
) -> impl Iterator<Item = Result<Id>> {
    let mut a = a.peekable();
    let mut b = b.peekable();
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (None, None) => None,
        (Some(_), None) => a.next(),
        (None, Some(_)) => b.next(),
        (Some(Err(_)), _) => a.next(),
        (_, Some(Err(_))) => b.next(),
        (Some(Ok(x)), Some(Ok(y))) => {
            if x <= y {
                a.next()
            } else {
                b.next()
            }
        }
    })
}

impl BlobCache {
    /// Open (building or updating as needed) the cache for `repo` under
    /// `state_dir`.
    ///
    /// # Errors
    /// The repository's index cannot be read, or the cache cannot be written.
    pub fn open(state_dir: &Path, repo: &Repo) -> Result<BlobCache> {
        Self::open_merging_at(state_dir, repo, 1 << 16)
    }

    /// As [`BlobCache::open`], merging recent ids into the file once there
    /// are more than `min_merge` of them and more than an eighth of the file.
    ///
    /// # Errors
    /// As [`BlobCache::open`].
    pub fn open_merging_at(state_dir: &Path, repo: &Repo, min_merge: u64) -> Result<BlobCache> {
        let dir: PathBuf = state_dir
            .join("cache")
            .join(format!("index-{}", repo.config.id.hex()));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let ids_path = dir.join("ids");
        let covers_path = dir.join("covers");
        let listed: BTreeSet<Id> = repo.index_ids()?.into_iter().map(|i| i.0).collect();
        let covers: Option<BTreeSet<Id>> = fs::read_to_string(&covers_path)
            .ok()
            .filter(|_| ids_path.exists())
            .map(|s| s.lines().filter_map(Id::parse).collect());
        let collect = |which: &mut dyn Iterator<Item = &Id>| -> Result<Vec<Id>> {
            let mut v = Vec::new();
            for i in which {
                for p in repo.read_index(&IndexId(*i))? {
                    v.extend(p.blobs.iter().map(|b| b.id.0));
                }
            }
            v.sort();
            v.dedup();
            Ok(v)
        };
        let mut recent = Vec::new();
        match covers {
            Some(c) if c.is_subset(&listed) => {
                recent = collect(&mut listed.difference(&c))?;
                let base_n = fs::metadata(&ids_path)
                    .map(|m| m.len())
                    .unwrap_or(0)
                    .saturating_sub(HEADER)
                    / 32;
                if recent.len() as u64 > (base_n / 8).max(min_merge) {
                    let old = read_ids(&ids_path)?;
                    let merged = dir.join("ids.merged");
                    write_ids(
                        &merged,
                        merge(old, std::mem::take(&mut recent).into_iter().map(Ok)),
                    )?;
                    fs::rename(&merged, &ids_path)?;
                    write_covers(&covers_path, &listed)?;
                }
            }
            _ => {
                let all = collect(&mut listed.iter())?;
                write_ids(&ids_path, all.into_iter().map(Ok))?;
                write_covers(&covers_path, &listed)?;
            }
        }
        let (file, fanout) = match load(&ids_path) {
            Ok(x) => x,
            Err(_) => {
                // Damaged (e.g. torn by a power cut: it is not fsynced into
                // its directory): rebuild from the repository.
                let all = collect(&mut listed.iter())?;
                write_ids(&ids_path, all.into_iter().map(Ok))?;
                write_covers(&covers_path, &listed)?;
                recent = Vec::new();
                load(&ids_path)?
            }
        };
        Ok(BlobCache {
            file,
            fanout,
            recent,
        })
    }

    /// Whether the repository (as of opening) holds blob `id`.
    ///
    /// # Errors
    /// Reading the cache file failed.
    pub fn contains(&self, id: &BlobId) -> Result<bool> {
        let id = &id.0;
        if self.recent.binary_search(id).is_ok() {
            return Ok(true);
        }
        let b = bucket(id);
        let (lo, hi) = (self.fanout[b], self.fanout[b + 1]);
        if hi <= lo {
            return Ok(false);
        }
        let mut buf = vec![0u8; ((hi - lo) * 32) as usize];
        self.file.read_exact_at(&mut buf, HEADER + lo * 32)?;
        Ok(buf
            .chunks_exact(32)
            .map(|c| <[u8; 32]>::try_from(c).expect("32 bytes"))
            .collect::<Vec<_>>()
            .binary_search(&id.0)
            .is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::Packer;

    #[test]
    fn cache_follows_the_index() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::init(&d.path().join("r"), &crate::repo::Protection::test("pw")).unwrap();
        let state = d.path().join("s");
        let blobs: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().repeat(10)).collect();
        let p = Packer::new(&repo);
        for b in &blobs[..100] {
            p.add(repo.blob_id(b), b).unwrap();
        }
        p.finish().unwrap();
        let repo = Repo::open(
            &d.path().join("r"),
            &crate::password::Given("pw".to_string().into()),
        )
        .unwrap();
        let c = BlobCache::open(&state, &repo).unwrap();
        assert!(
            blobs[..100]
                .iter()
                .all(|b| c.contains(&repo.blob_id(b)).unwrap())
        );
        assert!(
            !blobs[100..]
                .iter()
                .any(|b| c.contains(&repo.blob_id(b)).unwrap())
        );
        // More index files: merged forward.
        let p = Packer::new(&repo);
        for b in &blobs[100..200] {
            p.add(repo.blob_id(b), b).unwrap();
        }
        p.finish().unwrap();
        let repo = Repo::open(
            &d.path().join("r"),
            &crate::password::Given("pw".to_string().into()),
        )
        .unwrap();
        let c = BlobCache::open(&state, &repo).unwrap();
        assert!(!c.recent.is_empty(), "new index files are held in memory");
        assert!(
            blobs[..200]
                .iter()
                .all(|b| c.contains(&repo.blob_id(b)).unwrap())
        );
        assert!(
            !blobs[200..]
                .iter()
                .any(|b| c.contains(&repo.blob_id(b)).unwrap())
        );
        // ... and merged into the file once they are many.
        let c = BlobCache::open_merging_at(&state, &repo, 10).unwrap();
        assert!(c.recent.is_empty());
        assert!(
            blobs[..200]
                .iter()
                .all(|b| c.contains(&repo.blob_id(b)).unwrap())
        );
        assert!(
            !blobs[200..]
                .iter()
                .any(|b| c.contains(&repo.blob_id(b)).unwrap())
        );
        // A torn cache file is rebuilt.
        let ids = state
            .join("cache")
            .join(format!("index-{}", repo.config.id.hex()))
            .join("ids");
        let len = fs::metadata(&ids).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&ids)
            .unwrap()
            .set_len(len - 7)
            .unwrap();
        let c = BlobCache::open(&state, &repo).unwrap();
        assert!(
            blobs[..200]
                .iter()
                .all(|b| c.contains(&repo.blob_id(b)).unwrap())
        );
        // An index file disappears (as after prune): rebuilt, never stale.
        let first = repo.index_ids().unwrap()[0];
        repo.delete_file(&first).unwrap();
        let repo = Repo::open(
            &d.path().join("r"),
            &crate::password::Given("pw".to_string().into()),
        )
        .unwrap();
        let c = BlobCache::open(&state, &repo).unwrap();
        let present = blobs[..200]
            .iter()
            .filter(|b| c.contains(&repo.blob_id(b)).unwrap())
            .count();
        assert_eq!(present, 100);
    }
}

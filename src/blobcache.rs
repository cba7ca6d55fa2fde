//! A local, on-disk set of the blob ids the repository holds, so a snapshot
//! can skip blobs the repository already has without loading the whole
//! index into memory: memory stays bounded by the change, not the tree.
//!
//! The file (`STATE/cache/index-<repo id>/ids`) is a 512 KiB fanout table
//! (for every 16-bit prefix, where its ids start), the sorted ids, then the
//! ids of the index files they were read from ("covers") and their count;
//! a lookup reads one small bucket. Ids and covers are one file, replaced
//! atomically, so the cache can never claim the blobs of an index file it
//! does not know it holds. Index files are immutable, so when the
//! repository only gained index files their ids are read into memory (they
//! hold only recent changes) and merged into the file once they exceed an
//! eighth of it; when any index file it covers is gone (prune, repair) it
//! is rebuilt. A snapshot's cost therefore follows the change, not the
//! repository. A packer also hands over each index file it writes
//! ([`BlobCache::absorb`]), so even an import of millions of new blobs
//! keeps only an eighth of their ids in memory. It is a cache: deleting it
//! is safe.

use crate::format::{BlobId, Id, IndexId};
use crate::repo::Repo;
use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"LBIDS\0\0\x02";
const BUCKETS: usize = 1 << 16;
const HEADER: u64 = 8 + (BUCKETS as u64 + 1) * 8;

/// An open blob-id set: the sorted file, plus the ids of index files newer
/// than it, held in memory until they are worth merging.
pub struct BlobCache {
    path: PathBuf,
    file: File,
    fanout: Vec<u64>,
    /// Index files whose ids are in the file.
    covers: BTreeSet<Id>,
    /// Sorted ids not in the file yet, and the index files they are from.
    recent: Vec<Id>,
    recent_from: BTreeSet<Id>,
    min_merge: u64,
}

fn bucket(id: &Id) -> usize {
    (id.0[0] as usize) << 8 | id.0[1] as usize
}

/// The ids of a cache file whose fanout says it holds `n`.
fn read_ids(path: &Path, n: u64) -> Result<impl Iterator<Item = Result<Id>>> {
    let mut r = BufReader::new(File::open(path)?);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        bail!("blob cache {} has a bad header", path.display());
    }
    r.seek(SeekFrom::Start(HEADER))?;
    let mut left = n;
    Ok(std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        left -= 1;
        let mut b = [0u8; 32];
        match r.read_exact(&mut b) {
            Ok(()) => Some(Ok(Id(b))),
            Err(e) => Some(Err(e.into())),
        }
    }))
}

/// Write sorted, deduplicated `ids` read from the index files `covers` as
/// a cache file at `path` (atomically).
fn write_ids(
    path: &Path,
    ids: impl Iterator<Item = Result<Id>>,
    covers: &BTreeSet<Id>,
) -> Result<()> {
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
        for c in covers {
            w.write_all(&c.0)?;
        }
        w.write_all(&(covers.len() as u64).to_le_bytes())?;
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
/// fanout, and exactly as many ids and covers as it says.
fn load(path: &Path) -> Result<(File, Vec<u64>, BTreeSet<Id>)> {
    let file = File::open(path)?;
    let damaged = || anyhow::anyhow!("blob cache {} is damaged", path.display());
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0)?;
    if &magic != MAGIC {
        return Err(damaged());
    }
    let mut raw = vec![0u8; (HEADER - 8) as usize];
    file.read_exact_at(&mut raw, 8)?;
    let fanout: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let n = *fanout.last().expect("non-empty");
    let len = file.metadata()?.len();
    let mut count = [0u8; 8];
    if fanout.windows(2).any(|w| w[0] > w[1]) || len < HEADER + 8 {
        return Err(damaged());
    }
    file.read_exact_at(&mut count, len - 8)?;
    let c = u64::from_le_bytes(count);
    let ids_end = n.checked_mul(32).and_then(|b| b.checked_add(HEADER));
    let covers_len = c.checked_mul(32);
    if ids_end
        .zip(covers_len)
        .and_then(|(a, b)| a.checked_add(b)?.checked_add(8))
        != Some(len)
    {
        return Err(damaged());
    }
    let mut raw = vec![0u8; (c * 32) as usize];
    file.read_exact_at(&mut raw, HEADER + n * 32)?;
    let covers = raw
        .chunks_exact(32)
        .map(|c| Id(c.try_into().expect("32 bytes")))
        .collect();
    Ok((file, fanout, covers))
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
        let path = dir.join("ids");
        // The file of the previous layout, which kept its covers apart.
        let _ = fs::remove_file(dir.join("covers"));
        let listed: BTreeSet<Id> = repo.index_ids()?.into_iter().map(|i| i.0).collect();
        let collect = |which: &mut dyn Iterator<Item = &Id>| -> Result<Vec<Id>> {
            let mut v = Vec::new();
            for i in which {
                for p in repo.read_index(&IndexId(*i))? {
                    v.extend(p.blobs.iter().map(|b| b.id.0));
                }
            }
            v.sort_unstable();
            v.dedup();
            Ok(v)
        };
        let (file, fanout, covers) = match load(&path) {
            Ok((f, fanout, covers)) if covers.is_subset(&listed) => (f, fanout, covers),
            // Missing, damaged (torn by a power cut: it is not fsynced
            // into its directory), of the old layout, or stale: rebuilt
            // from the repository.
            _ => {
                let all = collect(&mut listed.iter())?;
                write_ids(&path, all.into_iter().map(Ok), &listed)?;
                load(&path)?
            }
        };
        let recent_from: BTreeSet<Id> = listed.difference(&covers).copied().collect();
        let mut cache = BlobCache {
            path,
            file,
            fanout,
            covers,
            recent: collect(&mut recent_from.iter())?,
            recent_from,
            min_merge,
        };
        cache.merge_if_due()?;
        Ok(cache)
    }

    /// Whether the repository (as of opening, and the index files handed
    /// over since) holds blob `id`.
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

    /// Take in the blobs of index file `index`, just written to the
    /// repository (its packs before it).
    ///
    /// # Errors
    /// Merging into the file failed (the ids stay in memory).
    pub fn absorb(&mut self, index: IndexId, ids: impl IntoIterator<Item = BlobId>) -> Result<()> {
        self.recent.extend(ids.into_iter().map(|b| b.0));
        self.recent.sort_unstable();
        self.recent.dedup();
        self.recent_from.insert(index.0);
        self.merge_if_due()
    }

    /// Ids held in memory, not yet in the file.
    pub fn recent(&self) -> usize {
        self.recent.len()
    }

    /// Merge the recent ids into the file once they are more than an
    /// eighth of it (and more than `min_merge`).
    fn merge_if_due(&mut self) -> Result<()> {
        let base_n = *self.fanout.last().expect("non-empty");
        if self.recent.len() as u64 <= (base_n / 8).max(self.min_merge) {
            return Ok(());
        }
        let covers: BTreeSet<Id> = self.covers.union(&self.recent_from).copied().collect();
        let merged = self.path.with_extension("merged");
        write_ids(
            &merged,
            merge(
                read_ids(&self.path, base_n)?,
                self.recent.iter().copied().map(Ok),
            ),
            &covers,
        )?;
        fs::rename(&merged, &self.path)?;
        let (file, fanout, covers) = load(&self.path)?;
        (self.file, self.fanout, self.covers) = (file, fanout, covers);
        self.recent = Vec::new();
        self.recent_from.clear();
        Ok(())
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

    /// An import of many blobs writes an index file every few of them and
    /// hands each to the cache: blobs met again after their index file was
    /// written are not stored twice, every blob is listed exactly once and
    /// readable, and the next run's cache covers those index files.
    #[test]
    fn a_large_import_writes_index_files_as_it_goes() {
        let d = tempfile::tempdir().unwrap();
        let mut repo =
            Repo::init(&d.path().join("r"), &crate::repo::Protection::test("pw")).unwrap();
        // Small packs: several per index file.
        repo.config.pack_size = 64;
        let state = d.path().join("s");
        let blobs: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().repeat(9)).collect();
        let p = Packer::with_cache(&repo, &state).index_every(10);
        for b in blobs.iter().chain(&blobs[..50]).chain(&blobs[290..]) {
            p.add(repo.blob_id(b), b).unwrap();
        }
        let seen = p.held();
        assert!(seen < 20, "{seen} blobs still held");
        assert_eq!(p.finish().unwrap().blobs, 300);
        let fresh = repo.reopen().unwrap();
        let indexes = fresh.index_ids().unwrap();
        assert!(indexes.len() >= 25, "{} index files", indexes.len());
        let listed: usize = indexes
            .iter()
            .flat_map(|i| fresh.read_index(i).unwrap())
            .map(|p| p.blobs.len())
            .sum();
        assert_eq!(listed, 300, "a blob was stored twice");
        for b in &blobs {
            assert_eq!(&fresh.read_blob(&fresh.blob_id(b)).unwrap(), b);
        }
        let c = BlobCache::open(&state, &fresh).unwrap();
        assert!(blobs.iter().all(|b| c.contains(&fresh.blob_id(b)).unwrap()));
    }

    /// Handed-over index files are merged into the file once they are many,
    /// and the file then covers them: reopening reads none of them again.
    #[test]
    fn absorbed_ids_are_merged_and_covered() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::init(&d.path().join("r"), &crate::repo::Protection::test("pw")).unwrap();
        let state = d.path().join("s");
        let mut c = BlobCache::open_merging_at(&state, &repo, 10).unwrap();
        let blobs: Vec<Vec<u8>> = (0..40u32).map(|i| i.to_le_bytes().repeat(5)).collect();
        for part in blobs.chunks(8) {
            let p = Packer::new(&repo);
            for b in part {
                p.add(repo.blob_id(b), b).unwrap();
            }
            p.finish().unwrap();
            let fresh = repo.reopen().unwrap();
            let newest = fresh
                .index_ids()
                .unwrap()
                .into_iter()
                .find(|i| !c.covers.contains(&i.0) && !c.recent_from.contains(&i.0))
                .unwrap();
            let ids: Vec<BlobId> = part.iter().map(|b| repo.blob_id(b)).collect();
            c.absorb(newest, ids).unwrap();
            assert!(c.recent() <= 10, "{} ids in memory", c.recent());
        }
        assert!(blobs.iter().all(|b| c.contains(&repo.blob_id(b)).unwrap()));
        let fresh = repo.reopen().unwrap();
        let again = BlobCache::open_merging_at(&state, &fresh, 1000).unwrap();
        assert!(again.covers.len() + again.recent_from.len() == 5);
        assert!(again.covers.len() >= 4, "merged index files are covered");
        assert!(
            blobs
                .iter()
                .all(|b| again.contains(&repo.blob_id(b)).unwrap())
        );
    }
}

//! Sorting layer entries that may not fit in memory: entries are taken in
//! any order, kept in memory up to a budget, and past it written out as
//! sorted runs to one unnamed temporary file, then read back merged in
//! path order (an external merge sort). A scan of ten million files holds
//! one run and one entry per run, not the tree.
//!
//! The temporary file is created unnamed (`O_TMPFILE`) in a directory the
//! caller chooses (the volume's state directory, which only root can
//! enter), so no other process can open it, and it is gone when the
//! sorter is dropped, whatever happened. Where the filesystem cannot make
//! unnamed files, it is created under a random name with `O_EXCL` and
//! unlinked at once.

use crate::layer::Entry;
use anyhow::{Context, Result, anyhow, bail};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Estimated bytes of entries held in memory before a run is written.
pub const RUN_BYTES: usize = 48 << 20;

/// Read buffer of each run during the merge.
const READ_BUF: usize = 128 << 10;

/// Most bytes one spilled entry may claim (a corrupt length cannot make
/// the merge allocate without end; a real entry is bounded far below by
/// the size of the file it describes).
const MAX_ENTRY: u64 = 1 << 32;

/// An estimate of the memory an entry holds (its struct and its heap
/// allocations), for the run budget.
pub fn weight(e: &Entry) -> usize {
    let mut n = std::mem::size_of::<Entry>() + e.path.len() + 32;
    if let crate::layer::Node::File { extents, .. } = &e.node {
        n += extents
            .iter()
            .map(|x| 48 + x.chunks.len() * std::mem::size_of::<crate::layer::Chunk>())
            .sum::<usize>();
    }
    if let crate::layer::Node::Symlink { target } = &e.node {
        n += target.len() + 16;
    }
    n + e
        .meta
        .xattrs
        .iter()
        .map(|(k, v)| k.len() + v.len() + 64)
        .sum::<usize>()
}

/// One sorted run in the temporary file.
struct Run {
    offset: u64,
    len: u64,
    entries: u64,
}

/// Entries being sorted; see the module docs.
pub struct Sorter {
    dir: PathBuf,
    budget: usize,
    held: Vec<Entry>,
    held_bytes: usize,
    file: Option<File>,
    end: u64,
    runs: Vec<Run>,
}

/// Where a [`Sorter`] writes its runs, and past how many (estimated)
/// bytes of entries held.
#[derive(Clone, Debug)]
pub struct Spill {
    /// The directory of the unnamed temporary file.
    pub dir: PathBuf,
    /// The run budget.
    pub budget: usize,
}

impl Spill {
    /// Runs in `dir`, past [`RUN_BYTES`] (or `LAYBAK_RUN_BYTES`, for
    /// tests: runs on small trees).
    pub fn in_dir(dir: &Path) -> Spill {
        Spill {
            dir: dir.to_path_buf(),
            budget: crate::repo::env_count("LAYBAK_RUN_BYTES", RUN_BYTES),
        }
    }
}

impl Sorter {
    /// A sorter spilling as `spill` says.
    pub fn new(spill: &Spill) -> Sorter {
        Sorter {
            dir: spill.dir.clone(),
            budget: spill.budget,
            held: Vec::new(),
            held_bytes: 0,
            file: None,
            end: 0,
            runs: Vec::new(),
        }
    }

    /// Add an entry.
    ///
    /// # Errors
    /// Writing a run failed.
    pub fn push(&mut self, e: Entry) -> Result<()> {
        self.held_bytes += weight(&e);
        self.held.push(e);
        if self.held_bytes >= self.budget {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        self.held.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        if self.file.is_none() {
            self.file = Some(temp_file(&self.dir)?);
        }
        let file = self.file.as_ref().expect("just made");
        let mut w = BufWriter::with_capacity(
            READ_BUF,
            At {
                file,
                pos: self.end,
            },
        );
        let mut buf = Vec::new();
        let mut len = 0u64;
        for e in &self.held {
            buf.clear();
            let buf2 =
                postcard::to_extend(e, std::mem::take(&mut buf)).context("serializing an entry")?;
            buf = buf2;
            w.write_all(&(buf.len() as u64).to_le_bytes())?;
            w.write_all(&buf)?;
            len += 8 + buf.len() as u64;
        }
        w.flush().with_context(|| {
            format!(
                "cannot write the scan's temporary file in {}",
                self.dir.display()
            )
        })?;
        self.runs.push(Run {
            offset: self.end,
            len,
            entries: self.held.len() as u64,
        });
        self.end += len;
        self.held = Vec::new();
        self.held_bytes = 0;
        Ok(())
    }

    /// Done adding: the entries, ready to be read in order (any number of
    /// times).
    ///
    /// # Errors
    /// Writing the last run failed.
    pub fn finish(mut self) -> Result<Sorted> {
        if self.file.is_some() {
            self.spill()?;
        } else {
            self.held.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        }
        Ok(Sorted {
            held: self.held,
            file: self.file,
            runs: self.runs,
        })
    }
}

/// Sorted entries: in memory, or runs in a temporary file.
pub struct Sorted {
    held: Vec<Entry>,
    file: Option<File>,
    runs: Vec<Run>,
}

impl Sorted {
    /// How many runs were written (0: all in memory).
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// The entries in path order.
    pub fn iter(&self) -> Merge<'_> {
        let mut heads = BinaryHeap::new();
        let mut readers = Vec::new();
        let mut err = None;
        if let Some(file) = &self.file {
            for (i, r) in self.runs.iter().enumerate() {
                let mut rd = RunReader {
                    rd: BufReader::with_capacity(
                        READ_BUF,
                        At {
                            file,
                            pos: r.offset,
                        }
                        .take(r.len),
                    ),
                    left: r.entries,
                };
                match rd.next() {
                    Ok(Some(e)) => heads.push(Reverse(Head { e, run: i })),
                    Ok(None) => {}
                    Err(e) => err = Some(e),
                }
                readers.push(rd);
            }
        }
        Merge {
            held: self.held.iter(),
            heads,
            readers,
            err,
        }
    }
}

/// The iterator of [`Sorted::iter`].
pub struct Merge<'a> {
    held: std::slice::Iter<'a, Entry>,
    heads: BinaryHeap<Reverse<Head>>,
    readers: Vec<RunReader<'a>>,
    err: Option<anyhow::Error>,
}

impl<'a> Iterator for Merge<'a> {
    type Item = Result<std::borrow::Cow<'a, Entry>>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.err.take() {
            return Some(Err(e));
        }
        if self.readers.is_empty() {
            return self.held.next().map(|e| Ok(std::borrow::Cow::Borrowed(e)));
        }
        let Reverse(Head { e, run }) = self.heads.pop()?;
        match self.readers[run].next() {
            Ok(Some(n)) => self.heads.push(Reverse(Head { e: n, run })),
            Ok(None) => {}
            Err(err) => self.err = Some(err),
        }
        Some(Ok(std::borrow::Cow::Owned(e)))
    }
}

/// The next entry of a run, ordered by path.
struct Head {
    e: Entry,
    run: usize,
}

impl PartialEq for Head {
    fn eq(&self, o: &Self) -> bool {
        self.e.path == o.e.path
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Head {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.e.path.cmp(&o.e.path)
    }
}

struct RunReader<'a> {
    rd: BufReader<std::io::Take<At<'a>>>,
    left: u64,
}

impl RunReader<'_> {
    fn next(&mut self) -> Result<Option<Entry>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let bad = || anyhow!("the scan's temporary file is damaged");
        let mut len = [0u8; 8];
        self.rd.read_exact(&mut len).map_err(|_| bad())?;
        let len = u64::from_le_bytes(len);
        if len > MAX_ENTRY {
            bail!(bad());
        }
        let mut buf = vec![0u8; len as usize];
        self.rd.read_exact(&mut buf).map_err(|_| bad())?;
        let e = postcard::from_bytes(&buf).map_err(|_| bad())?;
        Ok(Some(e))
    }
}

/// Positioned reads and writes on a shared file.
struct At<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for At<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An unnamed file in `dir`, readable and writable by this process only.
fn temp_file(dir: &Path) -> Result<File> {
    use rustix::fs::{Mode, OFlags};
    let what = || format!("cannot create a temporary file in {}", dir.display());
    let mode = Mode::from_raw_mode(0o600);
    match rustix::fs::open(dir, OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, mode) {
        Ok(fd) => return Ok(File::from(fd)),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::ISDIR | rustix::io::Errno::INVAL) => {
        }
        Err(e) => return Err(anyhow::Error::from(e).context(what())),
    }
    // No O_TMPFILE here: a fresh random name, never an existing file,
    // unlinked at once.
    let mut r = [0u8; 12];
    getrandom::fill(&mut r)
        .map_err(|e| anyhow!("{e}"))
        .with_context(what)?;
    let name = format!(
        ".laybak-sort-{}",
        r.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let dfd = crate::fsx::open_dir_path(dir).with_context(what)?;
    let fd = rustix::fs::openat(
        &dfd,
        name.as_str(),
        OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::RDWR | OFlags::CLOEXEC,
        mode,
    )
    .with_context(what)?;
    rustix::fs::unlinkat(&dfd, name.as_str(), rustix::fs::AtFlags::empty()).with_context(what)?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::tests::file;

    fn paths(s: &Sorted) -> Vec<Vec<u8>> {
        s.iter().map(|e| e.unwrap().path.clone()).collect()
    }

    #[test]
    fn entries_come_back_sorted_from_memory_and_from_runs() {
        let dir = tempfile::tempdir().unwrap();
        // A scrambled order, names with bytes below '/' among them.
        let mut names: Vec<String> = (0..500)
            .map(|i| format!("d{}/f-{}", (i * 37) % 11, (i * 101) % 500))
            .collect();
        names.extend(["a", "a-b", "a/x", "a.c/y", "a0"].map(String::from));
        let mut want: Vec<Vec<u8>> = names.iter().map(|n| n.as_bytes().to_vec()).collect();
        want.sort();
        for budget in [usize::MAX, 1, 2000, 50_000] {
            let mut s = Sorter::new(&Spill {
                dir: dir.path().into(),
                budget,
            });
            for (i, n) in names.iter().enumerate() {
                s.push(file(n, i as u8)).unwrap();
            }
            let sorted = s.finish().unwrap();
            if budget == usize::MAX {
                assert_eq!(sorted.runs(), 0);
            } else {
                assert!(sorted.runs() > 1, "budget {budget}: {} runs", sorted.runs());
            }
            assert_eq!(paths(&sorted), want, "budget {budget}");
            // Twice: the runs are read again from the start.
            assert_eq!(paths(&sorted), want, "budget {budget}, second pass");
            // Entries are whole, not just their paths.
            let e = sorted
                .iter()
                .find(|e| e.as_ref().unwrap().path == b"a0")
                .unwrap();
            assert_eq!(*e.unwrap(), file("a0", (names.len() - 1) as u8));
        }
        // Unnamed: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_damaged_run_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sorter::new(&Spill {
            dir: dir.path().into(),
            budget: 1,
        });
        for i in 0..10 {
            s.push(file(&format!("f{i}"), i)).unwrap();
        }
        let sorted = s.finish().unwrap();
        let f = sorted.file.as_ref().unwrap();
        // A huge length where the third run's entry starts.
        f.write_at(&u64::MAX.to_le_bytes(), sorted.runs[2].offset)
            .unwrap();
        let r: Result<Vec<_>> = sorted.iter().collect();
        assert!(r.unwrap_err().to_string().contains("damaged"));
        // Garbage in place of an entry.
        f.write_at(&4u64.to_le_bytes(), sorted.runs[2].offset)
            .unwrap();
        f.write_at(&[0xff; 4], sorted.runs[2].offset + 8).unwrap();
        let r: Result<Vec<_>> = sorted.iter().collect();
        assert!(r.is_err());
    }
}

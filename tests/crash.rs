//! Crashes at every storage operation, without root: each flow (archiving a
//! base tree, archiving an upper layer, forget, prune, repair) runs against
//! a backend that dies after its k-th change, for every k, both before the
//! change lands and after it lands unacknowledged. After each crash the
//! repository must check clean with `--read-data`, every snapshot it lists
//! must restore to exactly the tree it was taken of, and running the flow
//! again must complete it.

use laybak::archive::{Record, archive_layer};
use laybak::backend::Backend;
use laybak::backend::testing::{CrashAfter, Memory};
use laybak::format::{FileKind, SnapshotId, Time};
use laybak::layer::{self, Node};
use laybak::reclaim::{self, Policy};
use laybak::repo::Repo;
use laybak::scan::Source;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

type Tree = BTreeMap<String, Vec<u8>>;
type Dump = BTreeMap<String, Vec<u8>>;

fn content(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The trees of the three snapshots, and what each upper layer holds.
fn trees(seed: u32) -> (Tree, Tree, Tree, Tree, Tree) {
    let content = |n: u32, len: usize| content(n + 10 * seed, len);
    let mut s1 = Tree::new();
    s1.insert("a".into(), content(1, 20_000));
    s1.insert("b".into(), content(2, 3_000));
    s1.insert("d/e".into(), content(3, 70_000));
    let mut up2 = Tree::new();
    up2.insert("a".into(), content(4, 25_000));
    up2.insert("c".into(), content(5, 100));
    let mut s2 = s1.clone();
    s2.extend(up2.clone());
    let mut up3 = Tree::new();
    up3.insert("b".into(), content(6, 9_000));
    up3.insert("d/f".into(), content(7, 40_000));
    let mut s3 = s2.clone();
    s3.extend(up3.clone());
    (s1, up2, s2, up3, s3)
}

fn write_tree(dir: &Path, t: &Tree) {
    for (p, d) in t {
        let p = dir.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, d).unwrap();
    }
}

/// The crash tests run on encrypted repositories.
const PASSWORD: &str = "crash test";

fn open(b: Arc<dyn Backend>) -> Repo {
    Repo::open_backend(
        Path::new("memory"),
        b,
        &laybak::password::Given(PASSWORD.to_string().into()),
    )
    .unwrap()
}

/// A dead process's locks are stale (its pid is gone); this process is
/// alive, so remove them as the next run would.
fn reap_locks(m: &Memory) -> Memory {
    let mut d = m.dump();
    d.retain(|k, _| !k.starts_with("locks/"));
    Memory::from_dump(d)
}

/// check --read-data is clean and every snapshot restores to the tree its
/// tag names.
fn verify(repo: &Repo, want: &BTreeMap<&str, Tree>, ctx: &str) {
    let r = laybak::check::check(repo, true, false).unwrap();
    assert!(r.errors.is_empty(), "{ctx}: check: {:?}", r.errors);
    for (id, snap) in repo.snapshots().unwrap() {
        let layers = repo.layers_of(&snap).unwrap();
        let view = layer::restack(&layers);
        let mut got = Tree::new();
        for (path, m) in &view {
            if let Node::File { size, extents } = &m.entry.node {
                let mut data = vec![0u8; *size as usize];
                for x in extents {
                    let mut at = x.offset as usize;
                    for c in &x.chunks {
                        let b = repo.read_blob(&c.id).unwrap();
                        data[at..at + b.len()].copy_from_slice(&b);
                        at += b.len();
                    }
                }
                got.insert(String::from_utf8(path.clone()).unwrap(), data);
            }
        }
        let tag = snap.tags[0].as_str();
        assert!(
            got == want[tag],
            "{ctx}: snapshot {} ({tag}) does not restore to its tree",
            id.short()
        );
    }
}

/// One run of a flow; the cell carries what a crashed run noted (the
/// snapshot it was about to record), as a volume's state does.
type RunFn<'a> = &'a dyn Fn(&Repo, &Cell<Option<SnapshotId>>) -> anyhow::Result<()>;

struct Flow<'a> {
    name: &'a str,
    /// Run the flow once.
    run: RunFn<'a>,
    /// What must hold once the flow completed.
    done: &'a dyn Fn(&Repo),
}

/// Run `flow` on a copy of `before` crashing at every change; returns the
/// store after a clean run, and the number of crash points tried.
fn every_crash(before: &Dump, want: &BTreeMap<&str, Tree>, flow: &Flow<'_>) -> (Dump, u64) {
    let mut tried = 0;
    for k in 0.. {
        let mut finished = None;
        for after_effect in [false, true] {
            let mem = Arc::new(Memory::from_dump(before.clone()));
            let crash = Arc::new(CrashAfter::new(mem.clone(), k, after_effect));
            let pending = Cell::new(None);
            let res = (flow.run)(&open(crash.clone()), &pending);
            if !crash.crashed() {
                res.unwrap_or_else(|e| panic!("{}: clean run failed: {e:#}", flow.name));
                (flow.done)(&open(mem.clone()));
                finished = Some(mem.dump());
                break;
            }
            tried += 1;
            let ctx = format!(
                "{} crashed at change {k} (landed: {after_effect})",
                flow.name
            );
            // A crash while removing the lock (which `Drop` does best
            // effort, the work being done) leaves `res` Ok; every other
            // crash is an error.
            let point = crash.crash_point().unwrap_or_default();
            assert!(
                res.is_err() || point.starts_with("delete locks/"),
                "{ctx}: the crash at {point} was not reported"
            );
            let mem: Arc<dyn Backend> = Arc::new(reap_locks(&mem));
            let repo = open(mem.clone());
            verify(&repo, want, &ctx);
            (flow.run)(&repo, &pending)
                .unwrap_or_else(|e| panic!("{ctx}: the next run failed: {e:#}"));
            let repo = open(mem);
            verify(&repo, want, &format!("{ctx}, then rerun"));
            (flow.done)(&repo);
        }
        if let Some(d) = finished {
            assert!(tried > 0 || k == 0, "{}: no crash point", flow.name);
            return (d, tried);
        }
    }
    unreachable!()
}

fn archive<'a>(
    dir: &'a Path,
    source: Source,
    tag: &'a str,
    secs: i64,
) -> impl Fn(&Repo, &Cell<Option<SnapshotId>>) -> anyhow::Result<()> + 'a {
    move |repo, pending| {
        // As a volume does: a record noted before a crash and found stored
        // is the snapshot; nothing is archived twice.
        if let Some(id) = pending.get()
            && repo.contains(&id)?
        {
            return Ok(());
        }
        let prev = repo
            .snapshots()?
            .last()
            .map(|(id, s)| (*id, s.layers.clone()));
        let record = Record {
            volume: "v".into(),
            time: Time { secs, nanos: 0 },
            tags: vec![tag.into()],
            parent: prev.as_ref().map(|p| p.0),
            below: prev.map(|p| p.1).unwrap_or_default(),
        };
        archive_layer(repo, dir, source, None, record, false, |_, snap| {
            pending.set(Some(*snap));
            Ok(())
        })?;
        Ok(())
    }
}

/// Which pack ids sort first decides which copy of a blob prune keeps
/// after a crash between writing the new index and deleting the old ones:
/// several seeds cover both orders.
#[test]
fn every_crash_point_of_archive_forget_prune_and_repair_is_recovered() {
    for seed in 0..4 {
        one_history(seed);
    }
}

fn one_history(seed: u32) {
    let d = tempfile::tempdir().unwrap();
    let (s1, up2, s2, up3, s3) = trees(seed);
    let (base, u2, u3) = (
        d.path().join("base"),
        d.path().join("u2"),
        d.path().join("u3"),
    );
    write_tree(&base, &s1);
    write_tree(&u2, &up2);
    write_tree(&u3, &up3);
    let want: BTreeMap<&str, Tree> = [("s1", s1), ("s2", s2), ("s3", s3)].into();
    let store = {
        let m = Arc::new(Memory::new());
        Repo::create(
            Path::new("memory"),
            m.clone(),
            &laybak::repo::Protection::test(PASSWORD),
        )
        .unwrap();
        m.dump()
    };
    let count = |n: usize| move |r: &Repo| assert_eq!(r.snapshots().unwrap().len(), n);
    let mut total = 0;
    let mut step = |store: &Dump, flow: Flow<'_>| {
        let (after, tried) = every_crash(store, &want, &flow);
        eprintln!("{}: {tried} crash points", flow.name);
        total += tried;
        after
    };
    let store = step(
        &store,
        Flow {
            name: "archive base",
            run: &archive(&base, Source::Base, "s1", 1000),
            done: &count(1),
        },
    );
    let store = step(
        &store,
        Flow {
            name: "archive upper",
            run: &archive(&u2, Source::Upper, "s2", 2000),
            done: &count(2),
        },
    );
    let store = step(
        &store,
        Flow {
            name: "archive second upper",
            run: &archive(&u3, Source::Upper, "s3", 3000),
            done: &count(3),
        },
    );
    let keep_last = reclaim::keep_by(Policy {
        last: 1,
        ..Policy::default()
    });
    let store = step(
        &store,
        Flow {
            name: "forget",
            run: &|repo, _| {
                // As `forget` does: finish a plan a crashed run left.
                reclaim::forget(repo, &keep_last, reclaim::Scope::default(), false)?;
                Ok(())
            },
            done: &|r| {
                let snaps = r.snapshots().unwrap();
                assert_eq!(snaps.len(), 1);
                assert_eq!(snaps[0].1.tags, ["s3"]);
                assert!(r.list(FileKind::Plan).unwrap().files.is_empty());
            },
        },
    );
    let store = step(
        &store,
        Flow {
            name: "prune",
            run: &|repo, _| {
                reclaim::prune(repo, 0.0, false, None)?;
                Ok(())
            },
            done: &|r| {
                // Nothing unused is left: a second prune finds nothing.
                let again = reclaim::prune(r, 0.0, true, None).unwrap();
                assert_eq!(again.bytes_freed, 0, "{again:?}");
                assert_eq!(r.list(FileKind::Layer).unwrap().files.len(), 1);
            },
        },
    );
    step(
        &store,
        Flow {
            name: "repair index",
            run: &|repo, _| {
                reclaim::repair_index(repo)?;
                Ok(())
            },
            done: &|r| assert_eq!(r.index_ids().unwrap().len(), 1),
        },
    );
    assert!(total >= 20, "only {total} crash points");
}

/// Plays a snapshot that finishes while prune plans: when prune writes its
/// new index (the last step before it waits for the exclusive lock), the
/// snapshot record it did not see appears.
struct LateRecord {
    inner: Arc<Memory>,
    record: std::sync::Mutex<Option<(String, Vec<u8>)>>,
}

impl Backend for LateRecord {
    fn get(&self, n: &str) -> laybak::backend::Result<Vec<u8>> {
        self.inner.get(n)
    }
    fn get_range(&self, n: &str, o: u64, l: u64) -> laybak::backend::Result<Vec<u8>> {
        self.inner.get_range(n, o, l)
    }
    fn put(&self, n: &str, d: &[u8]) -> laybak::backend::Result<()> {
        self.inner.put(n, d)?;
        if n.starts_with("index/")
            && let Some((name, data)) = self.record.lock().unwrap().take()
        {
            self.inner.put(&name, &data)?;
        }
        Ok(())
    }
    fn put_if_absent(
        &self,
        n: &str,
        d: &[u8],
    ) -> laybak::backend::Result<laybak::backend::Created> {
        self.inner.put_if_absent(n, d)
    }
    fn list(&self, p: &str) -> laybak::backend::Result<Vec<laybak::backend::Entry>> {
        self.inner.list(p)
    }
    fn exists(&self, n: &str) -> laybak::backend::Result<bool> {
        self.inner.exists(n)
    }
    fn delete(&self, n: &str) -> laybak::backend::Result<()> {
        self.inner.delete(n)
    }
}

/// Found by the multi-host S3 test: the index prune writes for packs it
/// re-adopts can be byte for byte the late snapshot's own index, and the
/// sweep then deleted it with the old ones.
#[test]
fn prune_takes_in_a_snapshot_that_finished_while_it_planned() {
    let d = tempfile::tempdir().unwrap();
    let (s1, up2, s2, _, _) = trees(7);
    let (base, u2) = (d.path().join("base"), d.path().join("u2"));
    write_tree(&base, &s1);
    write_tree(&u2, &up2);
    let want: BTreeMap<&str, Tree> = [("s1", s1), ("s2", s2)].into();
    let mem = Arc::new(Memory::new());
    let repo = Repo::create(
        Path::new("memory"),
        mem.clone(),
        &laybak::repo::Protection::test(PASSWORD),
    )
    .unwrap();
    archive(&base, Source::Base, "s1", 1000)(&repo, &Cell::new(None)).unwrap();
    let second = Cell::new(None);
    archive(&u2, Source::Upper, "s2", 2000)(&repo, &second).unwrap();
    // Hold back the second record: its packs, index and layer are stored.
    let id = second.get().unwrap();
    let name = format!("snapshots/{}", id.hex());
    let data = mem.get(&name).unwrap();
    mem.delete(&name).unwrap();
    let late = Arc::new(LateRecord {
        inner: mem.clone(),
        record: std::sync::Mutex::new(Some((name, data))),
    });
    let repo = open(late.clone());
    reclaim::prune(&repo, 0.0, false, None).unwrap();
    assert!(
        late.record.lock().unwrap().is_none(),
        "the record never came"
    );
    let repo = open(mem.clone());
    assert_eq!(repo.snapshots().unwrap().len(), 2);
    verify(&repo, &want, "prune next to a late snapshot");
}

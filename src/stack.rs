//! The overlay rule: how a stack of layers looks merged, as the kernel
//! computes it — whiteouts, opaque directories and directory redirects
//! (renamed directories) included. It is a port of the model in
//! `shared/overlay/RESEARCH.md` A.7 (`ovlmodel.py`), which matched the
//! kernel's merged view on 5000 of 5000 random rename sequences; function
//! names follow the kernel's (`ovl_lookup`, `ovl_lookup_layer`,
//! `ovl_lookup_single`) for orientation.
//!
//! The rule is pure and generic over a [`Source`] of layers: repository
//! manifests ([`crate::layer`]: restore, diff, squash) and real layer
//! directories (the local store: status, merges, detach) answer the same
//! questions, so every part of laybak takes its decisions from this file.
//!
//! A model may also have a symbolic layer *below* its layers (`below`):
//! a lookup that reaches it records where in the namespace underneath it
//! would continue. That is what a squash of layers that still have layers
//! below them needs: which directory of the unknown namespace below each
//! merged directory continues into.

use crate::layer::DirKind;

/// What a name is in one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A whiteout: the name is deleted below.
    Whiteout,
    /// A directory, and how it treats the layers below.
    Dir(DirKind),
    /// Anything else (file, symlink, device, ...).
    Other,
}

/// Layers the rule reads: numbered bottom (0) to top.
pub trait Source {
    /// Number of layers.
    fn count(&self) -> usize;
    /// What `path` (relative, `/`-joined, the root is empty) is in `layer`.
    fn kind(&self, layer: usize, path: &[u8]) -> Option<Kind>;
    /// The names in directory `dir` of `layer`, sorted.
    fn names(&self, layer: usize, dir: &[u8]) -> Vec<Vec<u8>>;
}

/// One member of a merged directory's stack, top first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slot {
    /// The real entry at this path of this layer.
    Layer(usize, Vec<u8>),
    /// The symbolic namespace below: the merged entry continues into the
    /// directory at this path (relative to the root) there.
    Below(Vec<u8>),
}

/// Join a directory path and a name.
pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

/// The lookup state (`struct ovl_lookup_data`).
struct State {
    /// Relative name, or an absolute `/`-led path.
    name: Vec<u8>,
    is_dir: bool,
    stop: bool,
    /// The last redirect applied was absolute.
    absolute: bool,
    /// This is the bottom layer of the whole stack: xattrs are not read.
    last: bool,
}

/// A stack of layers read with the kernel's rule.
pub struct Model<'s, S: Source> {
    src: &'s S,
    below: bool,
}

impl<'s, S: Source> Model<'s, S> {
    /// The merged view of all of `src`'s layers; with `below`, over a
    /// symbolic namespace below them.
    pub fn new(src: &'s S, below: bool) -> Self {
        Self { src, below }
    }

    /// The root's stack: every layer's root, top first (and the root
    /// below).
    pub fn root(&self) -> Vec<Slot> {
        let mut s: Vec<Slot> = (0..self.src.count())
            .rev()
            .map(|l| Slot::Layer(l, Vec::new()))
            .collect();
        if self.below {
            s.push(Slot::Below(Vec::new()));
        }
        s
    }

    /// `ovl_lookup_single`: component `comp` in real directory `base` of
    /// `layer`; `prelen`/`post` locate it in an absolute walk.
    #[allow(clippy::too_many_arguments)]
    fn single(
        &self,
        layer: usize,
        base: &[u8],
        d: &mut State,
        comp: &[u8],
        prelen: usize,
        post: &[u8],
        last_elem: bool,
    ) -> Option<Vec<u8>> {
        let p = join(base, comp);
        match self.src.kind(layer, &p)? {
            Kind::Whiteout => {
                d.stop = true;
                None
            }
            Kind::Other => {
                d.stop = true;
                (!d.is_dir && last_elem).then_some(p)
            }
            Kind::Dir(kind) => {
                if last_elem {
                    d.is_dir = true;
                }
                if d.last {
                    return Some(p);
                }
                match kind {
                    DirKind::Merge => {}
                    DirKind::Opaque => d.stop = true,
                    DirKind::Redirect(r) if r.first() == Some(&b'/') => {
                        d.name = [r.as_slice(), post].concat();
                        d.stop = false;
                        d.absolute = true;
                    }
                    DirKind::Redirect(r) => {
                        d.name = [&d.name[..prelen], r.as_slice(), post].concat();
                        d.absolute = d.name.first() == Some(&b'/');
                    }
                }
                Some(p)
            }
        }
    }

    /// `ovl_lookup_layer`: the current name in `layer`, from `base` for a
    /// relative name or from the layer's root for an absolute one.
    fn in_layer(&self, layer: usize, base: &[u8], d: &mut State) -> Option<Vec<u8>> {
        if d.name.first() != Some(&b'/') {
            let name = d.name.clone();
            return self.single(layer, base, d, &name, 0, b"", true);
        }
        // `rem`: bytes of the name after the current component's start;
        // a redirect met on the way rewrites the prefix, never the rest.
        let mut rem = d.name.len() - 1;
        let mut cur = Vec::new();
        loop {
            let s = d.name.len() - rem;
            let tail = d.name[s..].to_vec();
            let (comp, post, end) = match tail.iter().position(|&b| b == b'/') {
                Some(k) => (&tail[..k], &tail[k..], false),
                None => (&tail[..], &b""[..], true),
            };
            cur = self.single(layer, &cur, d, comp, s, post, end)?;
            if end {
                return Some(cur);
            }
            rem -= comp.len() + 1;
        }
    }

    /// `ovl_lookup`: name `name` in the merged directory whose stack is
    /// `parent`. Returns the child's stack, top first (empty: not there).
    pub fn lookup(&self, parent: &[Slot], name: &[u8]) -> Vec<Slot> {
        let mut d = State {
            name: name.to_vec(),
            is_dir: false,
            stop: false,
            absolute: false,
            last: false,
        };
        let root = self.root();
        let mut poe = parent;
        let mut on_root = false;
        let mut out = Vec::new();
        let mut i = 0;
        while i < poe.len() && !d.stop {
            match &poe[i] {
                Slot::Below(loc) => {
                    let at = match d.name.strip_prefix(b"/") {
                        Some(abs) => abs.to_vec(),
                        None => join(loc, &d.name),
                    };
                    out.push(Slot::Below(at));
                    break;
                }
                Slot::Layer(layer, base) => {
                    let layer = *layer;
                    d.last = layer == 0 && !self.below;
                    let base: &[u8] = if d.name.first() == Some(&b'/') {
                        b""
                    } else {
                        base
                    };
                    let Some(found) = self.in_layer(layer, base, &mut d) else {
                        i += 1;
                        continue;
                    };
                    out.push(Slot::Layer(layer, found));
                    if d.stop {
                        break;
                    }
                    if d.absolute && !on_root {
                        // From here on, every layer below is searched from
                        // its root, whether or not it holds the parent.
                        poe = &root;
                        on_root = true;
                        i = self.src.count() - 1 - layer;
                    }
                    i += 1;
                }
            }
        }
        out
    }

    /// `ovl_dir_read_merged`: the names of the merged directory with stack
    /// `stack`, sorted, each with whether it is hidden (its top-most
    /// occurrence is a whiteout). Only the layers' names: the namespace
    /// below adds names the model cannot know.
    pub fn readdir(&self, stack: &[Slot]) -> Vec<(Vec<u8>, bool)> {
        let mut seen: std::collections::BTreeMap<Vec<u8>, bool> = Default::default();
        for s in stack {
            if let Slot::Layer(layer, p) = s {
                for n in self.src.names(*layer, p) {
                    if let std::collections::btree_map::Entry::Vacant(v) = seen.entry(n) {
                        let wh = self.src.kind(*layer, &join(p, v.key())) == Some(Kind::Whiteout);
                        v.insert(wh);
                    }
                }
            }
        }
        seen.into_iter().collect()
    }

    /// Whether the top of `stack` is a directory.
    pub fn is_dir(&self, stack: &[Slot]) -> bool {
        match stack.first() {
            Some(Slot::Layer(l, p)) => matches!(self.src.kind(*l, p), Some(Kind::Dir(_))),
            _ => false,
        }
    }

    /// The stack of merged path `path` (empty: not in the view).
    pub fn resolve(&self, path: &[u8]) -> Vec<Slot> {
        let mut stack = self.root();
        if path.is_empty() {
            return stack;
        }
        for c in path.split(|&b| b == b'/') {
            if !self.is_dir(&stack) {
                return Vec::new();
            }
            stack = self.lookup(&stack, c);
            if stack.is_empty() {
                return stack;
            }
        }
        stack
    }

    /// Visit every entry of the merged view, parents before children, in
    /// path order within each directory: `visit(path, stack, hidden)`,
    /// where `hidden` lists a directory's names hidden by a whiteout.
    pub fn walk(&self, mut visit: impl FnMut(&[u8], &[Slot], &[Vec<u8>])) {
        let mut todo: Vec<(Vec<u8>, Vec<Slot>)> = vec![(Vec::new(), self.root())];
        while let Some((path, stack)) = todo.pop() {
            if !self.is_dir(&stack) {
                visit(&path, &stack, &[]);
                continue;
            }
            let names = self.readdir(&stack);
            let hidden: Vec<Vec<u8>> = names
                .iter()
                .filter(|(_, wh)| *wh)
                .map(|(n, _)| n.clone())
                .collect();
            visit(&path, &stack, &hidden);
            // Reverse so that the first name is visited first.
            for (n, _) in names.iter().rev().filter(|(_, wh)| !wh) {
                let child = self.lookup(&stack, n);
                if !child.is_empty() {
                    todo.push((join(&path, n), child));
                }
            }
        }
    }
}

/// Where the merged directory with `stack` continues in the namespace
/// below, if it does.
pub fn below(stack: &[Slot]) -> Option<&[u8]> {
    stack.iter().find_map(|s| match s {
        Slot::Below(p) => Some(p.as_slice()),
        Slot::Layer(..) => None,
    })
}

/// How a directory of a squashed layer must be marked so that, over the
/// namespace below, it continues where the merged directory did: `parent`
/// is where its parent continues, `name` its name, `at` where it continues
/// (`None`: nowhere — it is opaque).
pub fn continuation(parent: Option<&[u8]>, name: &[u8], at: Option<&[u8]>) -> DirKind {
    let Some(at) = at else {
        return DirKind::Opaque;
    };
    if let Some(p) = parent {
        if at == join(p, name).as_slice() {
            return DirKind::Merge;
        }
        if crate::layer::parent(at) == p && !at.is_empty() {
            let base = at.rsplit(|&b| b == b'/').next().unwrap_or(at);
            return DirKind::Redirect(base.to_vec());
        }
    }
    DirKind::Redirect([b"/", at].concat())
}

/// One entry of the layer that squashes a stack ([`plan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// Its path in the squashed layer.
    pub path: Vec<u8>,
    /// The real entry it is (layer, path there); `None` for a whiteout.
    pub from: Option<(usize, Vec<u8>)>,
    /// For a directory: how it must be marked.
    pub dir: Option<DirKind>,
}

/// The entries of one layer with the effect of all of `src`'s layers, in
/// path order. With `bottom` (nothing is below the result) it is the merged
/// view itself: no whiteouts, no opaque or renamed directories. Otherwise
/// the layers are merged over a symbolic namespace below, and each merged
/// directory is marked by where it continues there ([`continuation`]): by
/// its own name (merge), elsewhere (a redirect), or nowhere (opaque); a
/// name whose top-most occurrence is a whiteout stays a whiteout wherever
/// the namespace below could still show it.
pub fn plan<S: Source>(src: &S, bottom: bool) -> Vec<Planned> {
    let model = Model::new(src, !bottom);
    let mut out: std::collections::BTreeMap<Vec<u8>, Planned> = Default::default();
    // Where each merged directory continues below.
    let mut cont: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>> = Default::default();
    model.walk(|path, s, hidden| {
        let Some(Slot::Layer(layer, real)) = s.first() else {
            return;
        };
        let from = Some((*layer, real.clone()));
        if !model.is_dir(s) {
            out.insert(
                path.to_vec(),
                Planned {
                    path: path.to_vec(),
                    from,
                    dir: None,
                },
            );
            return;
        }
        let at = below(s).map(<[u8]>::to_vec);
        let kind = if bottom || path.is_empty() {
            DirKind::Merge
        } else {
            let (par, name) = crate::layer::split(path);
            let pc = cont.get(par).cloned().flatten();
            continuation(pc.as_deref(), name, at.as_deref())
        };
        if at.is_some() {
            for h in hidden {
                let p = join(path, h);
                out.insert(
                    p.clone(),
                    Planned {
                        path: p,
                        from: None,
                        dir: None,
                    },
                );
            }
        }
        cont.insert(path.to_vec(), at);
        out.insert(
            path.to_vec(),
            Planned {
                path: path.to_vec(),
                from,
                dir: Some(kind),
            },
        );
    });
    out.into_values().collect()
}

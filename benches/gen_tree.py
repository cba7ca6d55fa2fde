#!/usr/bin/env python3
"""Deterministic benchmark data for benches/compare.sh.

Everything is derived from a seed string, so two runs with the same
arguments produce byte-identical trees and identical mutations.

    gen_tree.py small ROOT N SEED          source-tree-like: N files, mixed sizes
    gen_tree.py large ROOT TOTAL SEED      four big files, TOTAL bytes together,
                                           the first one TOTAL/2 ("the 1 GiB file")
    gen_tree.py copy SRC DST MAXFILES      copy the first MAXFILES regular files of
                                           SRC (plus symlinks, dirs) into DST
    gen_tree.py mutate LABEL PCT SEED ROOT...
                                           change PCT% (or, written =N, exactly N)
                                           of the regular files of the last ROOT
                                           (overwrite / append / delete / add),
                                           identically in every ROOT
    gen_tree.py poke REL LEN SEED LABEL ROOT...
                                           overwrite LEN bytes in place inside file
                                           REL at a seeded, 4 KiB-aligned offset;
                                           prints the offset and, per ROOT, the
                                           seconds the write (and fsync) took
    gen_tree.py summary ROOT               "FILES BYTES" of the regular files
"""
import os
import random
import stat
import sys
import time

WORDS = ("alpha beta gamma delta layer overlay backup snapshot restic borg "
         "chunk pack index tree blob file dir upper lower merged work seal "
         "archive restore mount volume repo zstd blake3 hash fold log fn let "
         "mut impl struct enum match return self pub use mod crate where "
         "static const unsafe async await trait type loop while for in if "
         "else break continue").split()


def text_pool(rng, n):
    out, size = [], 0
    while size < n:
        line = "    " * rng.randint(0, 3) + " ".join(
            rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + ";\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n]


POOL = text_pool(random.Random("pool"), 4 << 20)


def content(rng, size, tag, block=(512, 8192)):
    """Unique header, then a mix of text-like (compressible) and random
    (incompressible) blocks; the mix varies per file."""
    buf = bytearray(f"{tag}\n".encode())
    comp = rng.random()
    lo, hi = block
    while len(buf) < size:
        n = min(rng.randint(lo, hi), size - len(buf))
        if rng.random() < comp:
            o = rng.randrange(0, len(POOL) - n)
            buf += POOL[o:o + n]
        else:
            buf += rng.randbytes(n)
    return bytes(buf[:size])


def pick_size(rng):
    """Source-tree-like sizes: many tiny files, a long tail."""
    r = rng.random()
    if r < 0.25:
        return int(2 ** rng.uniform(6, 10))          # 64 B .. 1 KiB
    if r < 0.95:
        return int(2 ** rng.uniform(10, 14))         # 1 .. 16 KiB
    if r < 0.995:
        return int(2 ** rng.uniform(14, 18))         # 16 .. 256 KiB
    return int(2 ** rng.uniform(18, 21))             # 256 KiB .. 2 MiB


EXTS = (".rs", ".c", ".h", ".py", ".md", ".txt", ".json", ".o", ".png", ".dat")


def rel_path(i):
    """About 60 files per directory, three levels deep."""
    d = i // 60
    ext = EXTS[(i * 7) % len(EXTS)]
    return f"m{d // 3600:03d}/p{(d // 60) % 60:02d}/q{d % 60:02d}/f{i:07d}{ext}"


def gen_small(root, n, seed):
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        rel = rel_path(i)
        p = os.path.join(root, rel)
        if i % 60 == 0:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(content(rng, pick_size(rng), rel))
        if i % 500 == 7:                              # a few symlinks, like a real tree
            os.symlink(os.path.basename(rel), p + ".link")


def gen_large(root, total, seed):
    """file0 = total/2, file1 = total/4, file2 = file3 = total/8.
    Compressible fraction per file: 0.5, 0.3, 0.7, 0 (like media)."""
    os.makedirs(root, exist_ok=True)
    sizes = [total // 2, total // 4, total // 8, total - total // 2 - total // 4 - total // 8]
    comps = [0.5, 0.3, 0.7, 0.0]
    for k, (size, comp) in enumerate(zip(sizes, comps)):
        rng = random.Random(f"{seed}:large:{k}")
        with open(os.path.join(root, f"file{k}.bin"), "wb") as f:
            left = size
            while left > 0:
                n = min(64 << 10, left)
                if rng.random() < comp:
                    o = rng.randrange(0, len(POOL) - n)
                    f.write(POOL[o:o + n])
                else:
                    f.write(rng.randbytes(n))
                left -= n


def regular_files(root):
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        if d == root and ".laybak" in dirs:
            dirs.remove(".laybak")
        for f in sorted(files):
            p = os.path.join(d, f)
            if stat.S_ISREG(os.lstat(p).st_mode):
                out.append(os.path.relpath(p, root))
    return out


def copy_limited(src, dst, maxfiles):
    """Regular files, symlinks and directories of SRC, stopping after
    MAXFILES regular files (walk order is sorted, so deterministic)."""
    import shutil
    n = 0
    os.makedirs(dst, exist_ok=True)
    for d, dirs, files in os.walk(src):
        dirs.sort()
        rel = os.path.relpath(d, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in sorted(files):
            s, t = os.path.join(d, f), os.path.join(dst, rel, f)
            st = os.lstat(s)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), t)
            elif stat.S_ISREG(st.st_mode):
                shutil.copy2(s, t)
                n += 1
                if n >= maxfiles:
                    return


def mutate(label, pct, seed, roots):
    files = regular_files(roots[-1])          # the last root is a plain directory
    rng = random.Random(f"{seed}:mutate:{label}")
    k = int(pct[1:]) if pct.startswith("=") else max(1, round(len(files) * float(pct) / 100))
    chosen = rng.sample(files, min(k, len(files)))
    ops = {"overwrite": 0, "append": 0, "delete": 0, "add": 0}
    acts = []
    for j, rel in enumerate(chosen):
        r = rng.random()
        op = "overwrite" if r < 0.4 else "append" if r < 0.7 else "delete" if r < 0.85 else "add"
        ops[op] += 1
        if op == "overwrite":
            acts.append((op, rel, content(rng, pick_size(rng), f"{label}:{rel}")))
        elif op == "append":
            acts.append((op, rel, rng.randbytes(rng.randint(64, 8192))))
        elif op == "delete":
            acts.append((op, rel, None))
        else:
            new = os.path.join(os.path.dirname(rel), f"n{label}_{j:06d}.dat")
            acts.append((op, new, content(rng, pick_size(rng), f"{label}:{new}")))
    for root in roots:
        for op, rel, data in acts:
            p = os.path.join(root, rel)
            if op == "delete":
                os.unlink(p)
            else:
                with open(p, "ab" if op == "append" else "wb") as f:
                    f.write(data)
    print(len(chosen), " ".join(f"{o}={n}" for o, n in ops.items()))


def poke(rel, length, seed, label, roots):
    size = os.path.getsize(os.path.join(roots[-1], rel))
    rng = random.Random(f"{seed}:poke:{label}")
    off = rng.randrange(0, max(1, size - length)) // 4096 * 4096
    data = rng.randbytes(length)
    times = []
    for root in roots:
        t = time.monotonic()
        fd = os.open(os.path.join(root, rel), os.O_WRONLY)
        try:
            os.pwrite(fd, data, off)
            os.fsync(fd)
        finally:
            os.close(fd)
        times.append(f"{time.monotonic() - t:.3f}")
    print(off, " ".join(times))


def summary(root):
    n = size = 0
    for d, dirs, files in os.walk(root):
        if d == root and ".laybak" in dirs:
            dirs.remove(".laybak")
        for f in files:
            st = os.lstat(os.path.join(d, f))
            if stat.S_ISREG(st.st_mode):
                n += 1
                size += st.st_size
    print(n, size)


def main(a):
    cmd = a[1] if len(a) > 1 else ""
    if cmd == "small":
        gen_small(a[2], int(a[3]), a[4])
    elif cmd == "large":
        gen_large(a[2], int(a[3]), a[4])
    elif cmd == "copy":
        copy_limited(a[2], a[3], int(a[4]))
    elif cmd == "mutate":
        mutate(a[2], a[3], a[4], a[5:])
    elif cmd == "poke":
        poke(a[2], int(a[3]), a[4], a[5], a[6:])
    elif cmd == "summary":
        summary(a[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)

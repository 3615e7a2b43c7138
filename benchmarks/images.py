"""Deterministic test disk images shared by the benchmarks.

A *base* image is a sparse raw file holding an ext4 filesystem made by
`mke2fs -d TREE`, where TREE is generated from a seed: many small text files,
medium binaries copied from /usr, and random (incompressible) files. *Derived*
images are copies of the base changed in place with `debugfs -w` (new files, a
deleted file, an overwritten file, a new directory) — a few MB each, the way an
image update changes a disk — never mounted.

Everything is cached under a work directory with a stamp of the parameters, so
a second benchmark run with `--keep` reuses the images.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
FIXED_TIME = 1_700_000_000  # mtime of every generated file, for reproducible images
UUID = "5e1f0c4e-4a1b-4c4e-9a5f-7261696e0001"
HASH_SEED = "5e1f0c4e-4a1b-4c4e-9a5f-7261696e0002"
USR_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib/python3", "/usr/share",
            "/usr/lib")
_WORDS_TEXT = ("the image repository stores chunks once and serves them to many nodes kernel "
         "module network interface config package version release security update daemon "
         "service start stop enable disable user group owner permission file system ext4 "
         "journal block inode directory mount boot loader grub initramfs virtio console "
         "serial dhcp address route mirror debian bookworm python library shared object "
         "binary license copyright documentation manual page example test")
WORDS = _WORDS_TEXT.split()


def parse_size(text: str) -> int:
    """'2G', '512M', '64K', '1048576' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {text!r}")
    unit = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def human(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n:.0f} B"


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; on failure raise with its stderr."""
    proc = subprocess.run(argv, capture_output=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    return proc  # type: ignore[no-any-return]


def read_through(path: Path, block: int = 4 * MiB) -> int:
    """Read a file once (warms the page cache); returns its size."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        while n := f.readinto(buf):
            total += n
    return total


def disk_usage(root: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under root, like `du -sb` / `du -s`."""
    apparent = allocated = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


# -- the file tree ----------------------------------------------------------------

def _text(rng: random.Random, size: int) -> bytes:
    out: list[str] = []
    n = 0
    while n < size:
        line = " ".join(rng.choices(WORDS, k=rng.randint(4, 14))) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def _usr_candidates(min_size: int = 64 * KiB, max_size: int = 8 * MiB) -> list[Path]:
    seen: set[Path] = set()
    found: list[Path] = []
    for top in USR_DIRS:
        for dirpath, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(files):
                p = Path(dirpath) / name
                if p in seen or p.is_symlink():
                    continue
                try:
                    size = p.stat().st_size
                except OSError:
                    continue
                if p.is_file() and min_size <= size <= max_size and os.access(p, os.R_OK):
                    seen.add(p)
                    found.append(p)
    return found


def make_tree(root: Path, total: int, seed: int) -> list[str]:
    """Fill `root` with about `total` bytes; returns the files' paths relative to root.

    Mix by bytes: 25 % small text files (1-16 KiB), 35 % medium binaries from /usr
    (64 KiB - 8 MiB), 40 % random incompressible files (256 KiB - 16 MiB).
    """
    rng = random.Random(seed)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    files: list[str] = []

    def put(rel: str, data: bytes) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files.append(rel)

    budget = total * 25 // 100
    i = 0
    while budget > 0:
        size = min(budget, rng.randint(1 * KiB, 16 * KiB))
        put(f"etc/conf.d/{i % 64:02d}/text-{i:06d}.conf" if i % 3 == 0 else
            f"usr/share/doc/pkg-{i % 400:03d}/doc-{i:06d}.txt", _text(rng, size))
        budget -= size
        i += 1

    budget = total * 35 // 100
    candidates = _usr_candidates()
    rng.shuffle(candidates)
    for j, src in enumerate(candidates):
        if budget <= 0:
            break
        data = src.read_bytes()[:budget]
        put(f"usr/lib/bin-{j % 32:02d}/{j:05d}-{src.name}", data)
        budget -= len(data)

    budget = total - sum((root / f).stat().st_size for f in files)
    k = 0
    while budget > 0:
        size = min(budget, rng.randint(256 * KiB, 16 * MiB))
        put(f"var/lib/blobs/{k % 16:02d}/blob-{k:05d}.bin", rng.randbytes(size))
        budget -= size
        k += 1

    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            os.utime(os.path.join(dirpath, name), (FIXED_TIME, FIXED_TIME))
    return sorted(files)


def make_ext4(image: Path, size: int, tree: Path) -> None:
    """A sparse raw image of `size` bytes with an ext4 filesystem holding `tree`."""
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(FIXED_TIME))
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "rain-bench", "-U", UUID,
         "-E", f"hash_seed={HASH_SEED},root_owner=0:0", "-d", str(tree), str(image)], env=env)


# -- derived images -----------------------------------------------------------------

def _replace(rel: str, src: Path) -> list[str]:
    """debugfs commands that replace a file the way dpkg does: write new, rename over old.

    (`ln` + `unlink` is a rename: neither touches the link count.) The new data lands
    in newly allocated blocks, as it would on a running system.
    """
    return [f"write {src} /{rel}.dpkg-new", f"rm /{rel}", f"ln /{rel}.dpkg-new /{rel}",
            f"unlink /{rel}.dpkg-new"]


def derive_image(base: Path, out: Path, index: int, seed: int, tree: Path, files: list[str],
                 scratch: Path) -> int:
    """Copy `base` to `out` and change it in place with debugfs; returns bytes written.

    Each derived image gets: a new directory with a 2-4 MiB random payload and a
    few dozen small text files, one file deleted, one binary replaced by an
    edited copy (as a package update does) and one text file rewritten.
    """
    rng = random.Random(seed * 1000 + index)
    out.unlink(missing_ok=True)
    run(["cp", "--reflink=auto", "--sparse=always", str(base), str(out)])
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    cmds: list[str] = [f"mkdir /update-{index}"]
    written = 0

    payload = scratch / "payload.bin"
    payload.write_bytes(rng.randbytes(rng.randint(2 * MiB, 4 * MiB)))
    cmds.append(f"write {payload} /update-{index}/payload.bin")
    written += payload.stat().st_size
    for t in range(rng.randint(20, 40)):
        src = scratch / f"note-{t}.txt"
        src.write_bytes(_text(rng, rng.randint(1 * KiB, 16 * KiB)))
        cmds.append(f"write {src} /update-{index}/note-{t}.txt")
        written += src.stat().st_size

    binaries = [f for f in files if f.startswith("usr/lib/bin-")]
    texts = [f for f in files if f.endswith((".txt", ".conf"))]
    victim, binary, text = rng.choice(texts), rng.choice(binaries), rng.choice(texts)
    while text == victim:
        text = rng.choice(texts)
    cmds.append(f"rm /{victim}")

    data = bytearray((tree / binary).read_bytes())
    for _ in range(max(1, len(data) // (64 * KiB))):  # a patched build: scattered edits
        pos = rng.randrange(len(data))
        data[pos : pos + 16] = rng.randbytes(16)[: len(data) - pos]
    new_bin = scratch / "binary.new"
    new_bin.write_bytes(bytes(data))
    cmds += _replace(binary, new_bin)
    written += len(data)

    old_text = (tree / text).read_bytes()
    new_text = scratch / "text.new"
    new_text.write_bytes(old_text[: len(old_text) // 2] + _text(rng, 2 * KiB))
    cmds += _replace(text, new_text)
    written += new_text.stat().st_size

    script = scratch / "cmds"
    script.write_text("\n".join(cmds) + "\n")
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(FIXED_TIME + index))
    proc = run(["debugfs", "-w", "-f", str(script), str(out)], env=env)
    errors = [ln for ln in proc.stderr.decode(errors="replace").splitlines()
              if ln.strip() and not ln.startswith("debugfs ")]
    if errors:
        raise RuntimeError(f"debugfs on {out}: {errors[:5]}")
    shutil.rmtree(scratch)
    return written


def changed_blocks(a: Path, b: Path, block: int = 4 * KiB) -> int:
    """Bytes in `block`-sized blocks that differ between two same-sized files."""
    diff = 0
    step = 4 * MiB
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(step), fb.read(step)
            if not x and not y:
                return diff
            if x == y:
                continue
            for off in range(0, max(len(x), len(y)), block):
                if x[off : off + block] != y[off : off + block]:
                    diff += block


def to_qcow2(raw: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)])


# -- the image set ----------------------------------------------------------------------

@dataclass
class ImageSet:
    base: Path
    derived: list[Path]
    size: int
    data_bytes: int
    written: list[int] = field(default_factory=list)
    qcow2: list[Path] = field(default_factory=list)

    @property
    def all(self) -> list[Path]:
        return [self.base, *self.derived]


def build_image_set(work: Path, size: int, count: int = 9, seed: int = 1,
                    data_bytes: int | None = None, log: bool = True) -> ImageSet:
    """Base + `count` derived raw images under work/images (reused when parameters match)."""
    data_bytes = size // 4 if data_bytes is None else data_bytes
    folder = work / "images"
    stamp = folder / "stamp.json"
    params = {"size": size, "count": count, "seed": seed, "data": data_bytes, "v": 2}
    base = folder / "base.raw"
    derived = [folder / f"derived-{i}.raw" for i in range(1, count + 1)]
    if stamp.exists() and all(p.exists() for p in [base, *derived]):
        saved = json.loads(stamp.read_text())
        if saved.get("params") == params:
            if log:
                print(f"reusing images in {folder}", flush=True)
            return ImageSet(base, derived, size, data_bytes, saved.get("written", []))
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    tree = folder / "tree"
    files = make_tree(tree, data_bytes, seed)
    if log:
        print(f"tree: {len(files)} files, {human(data_bytes)} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    t0 = time.perf_counter()
    make_ext4(base, size, tree)
    if log:
        print(f"base: {base} ({human(size)}, ext4, {time.perf_counter() - t0:.1f} s)",
              flush=True)
    written = []
    t0 = time.perf_counter()
    for i, out in enumerate(derived, 1):
        written.append(derive_image(base, out, i, seed, tree, files, folder / "scratch"))
    if log:
        print(f"derived: {count} images, {human(sum(written) / max(count, 1))} written each on "
              f"average ({time.perf_counter() - t0:.1f} s)", flush=True)
    shutil.rmtree(tree)
    stamp.write_text(json.dumps({"params": params, "written": written}))
    return ImageSet(base, derived, size, data_bytes, written)


def ensure_qcow2(images: ImageSet, log: bool = True) -> list[Path]:
    """qcow2 conversions of every image (cached next to the raw files)."""
    out: list[Path] = []
    t0 = time.perf_counter()
    for raw in images.all:
        q = raw.with_suffix(".qcow2")
        if not q.exists() or q.stat().st_mtime < raw.stat().st_mtime:
            to_qcow2(raw, q)
        out.append(q)
    images.qcow2 = out
    if log:
        sizes = [q.stat().st_size for q in out]
        print(f"qcow2: {len(out)} files, {human(sum(sizes) / len(sizes))} each on average "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return out


# -- reporting -----------------------------------------------------------------------------

def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1024 * 1024):.1f} GiB"
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram": mem,
            "kernel": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def table(headers: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """A plain aligned table, or a GitHub Markdown one."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*headers), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


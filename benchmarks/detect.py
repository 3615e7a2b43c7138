"""What reading OS, release, arch and packages costs on a 2 GiB image (issue 10, §4).

A GPT disk of 2 GiB whose root partition is ext4 made with `mke2fs -d` from a
tree of ~1 GiB of files (benchmarks/images.py) plus this host's own
/usr/lib/os-release, /etc/os-release symlink, /var/lib/dpkg/status and arch,
and /bin/sh. It is stored in a fresh repository as raw and as qcow2 (plain,
and zstd-compressed), and detection runs over each *stored* image, as it does
when a push ends or `rain rescan` asks: bytes and reads of the virtual disk,
chunks fetched from the store, wall and CPU seconds.

Usage:  .venv/bin/python benchmarks/detect.py [--markdown] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from images import GiB, MiB, human, machine_info, make_tree, table

from rain.repo.detect import read_stored_system
from rain.repo.service import Repository


def build_disk(work: Path) -> Path:
    tree = work / "tree"
    make_tree(tree, GiB, seed=7)
    for rel in ("usr/lib", "etc", "var/lib/dpkg", "usr/bin"):
        (tree / rel).mkdir(parents=True, exist_ok=True)
    shutil.copy("/usr/lib/os-release", tree / "usr/lib/os-release")
    (tree / "etc/os-release").symlink_to("../usr/lib/os-release")
    shutil.copy("/var/lib/dpkg/status", tree / "var/lib/dpkg/status")
    if Path("/var/lib/dpkg/arch").exists():
        shutil.copy("/var/lib/dpkg/arch", tree / "var/lib/dpkg/arch")
    shutil.copy(Path("/bin/sh").resolve(), tree / "usr/bin/dash")
    (tree / "usr/bin/sh").symlink_to("dash")
    (tree / "bin").symlink_to("usr/bin")
    fs_size = 2 * GiB - 4 * MiB
    fs = work / "root.ext4"
    with fs.open("wb") as f:
        f.truncate(fs_size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(fs)], check=True)
    disk = work / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(2 * GiB)
    subprocess.run(["sfdisk", "--quiet", str(disk)], check=True,
                   input=f"label: gpt\nstart=2048, size={fs_size // 512}, type=L\n".encode())
    subprocess.run(["dd", f"if={fs}", f"of={disk}", "bs=4M", "seek=1M", "oflag=seek_bytes",
                    "conv=sparse,notrunc", "status=none"], check=True)
    fs.unlink()
    return disk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rain-detect-"))
    work.mkdir(parents=True, exist_ok=True)
    disk = build_disk(work)
    variants = {"raw": disk}
    for name, opts in (("qcow2", []), ("qcow2 zstd -c", ["-c", "-o", "compression_type=zstd"])):
        out = work / f"disk-{len(variants)}.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *opts, str(disk),
                        str(out)], check=True)
        variants[name] = out

    repo = Repository.open(work / "repo", f"sqlite:///{work / 'catalog.db'}")
    repo.bootstrap_admin()
    admin = repo.catalog.get_user("admin")
    rows = []
    for name, path in variants.items():
        image = repo.create(admin, {"name": f"bench-{len(rows)}", "os_distro": "x",
                                    "os_release": "x", "arch": "x", "packages": {"x": "1"}})
        image = repo.upload_file(admin, image.id, path)  # all fields given: push detects nothing
        manifest = repo.store.get_manifest(repo.catalog.manifest_id(image.id) or "")
        start, cpu = time.perf_counter(), time.process_time()
        info, reader, budget = read_stored_system(repo.store, image, manifest)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        rows.append([name, human(path.stat().st_size), f"{info.os_distro} {info.os_release}"
                     f" {info.arch}", str(len(info.packages)), human(budget.spent_bytes),
                     str(budget.spent_reads), f"{reader.fetches} ({human(reader.fetched_bytes)})",
                     f"{wall:.2f}", f"{cpu:.2f}"])
    repo.close()
    print(f"# detection on a 2 GiB image — {machine_info()}\n")
    print(table(["image", "file", "found", "packages", "bytes read", "reads",
                 "chunks fetched", "wall s", "CPU s"], rows, args.markdown))
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

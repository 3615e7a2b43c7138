"""ImageTree: host-side reads and writes of a stranger's tree never leave the tree."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from rain.model.errors import InvalidImage
from rain.sandbox import ImageTree


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host directory with a file the image must never reach."""
    d = tmp_path / "host"
    d.mkdir()
    (d / "passwd").write_text("host passwd\n")
    (d / "keep.deb").write_bytes(b"host file")
    return d


@pytest.fixture
def tree(tmp_path: Path, host: Path) -> ImageTree:
    root = tmp_path / "image"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("image passwd\n")
    # What a hostile image plants: absolute and relative links out, a link into the host.
    (root / "etc/motd").symlink_to(host / "passwd")
    (root / "etc/up").symlink_to("../../../../../../../" + str(host).lstrip("/"))
    (root / "var/cache/apt").mkdir(parents=True)
    (root / "var/cache/apt/archives").symlink_to(str(host))
    (root / "hostroot").symlink_to("/")
    return ImageTree(root)


def test_absolute_links_resolve_inside_the_tree(tree: ImageTree, host: Path) -> None:
    # /etc/motd -> {host}/passwd means, inside the image, a file that does not exist.
    assert not tree.exists("/etc/motd")
    assert tree.is_symlink("/etc/motd")
    with pytest.raises(FileNotFoundError):
        tree.read_text("/etc/motd")
    assert tree.read_text("/hostroot/etc/passwd") == "image passwd\n"
    assert not tree.exists("/etc/up")  # ../../.. stops at the image's root
    assert tree.read_text("/../../../../etc/passwd") == "image passwd\n"


def test_writes_replace_links_instead_of_following_them(tree: ImageTree, host: Path) -> None:
    tree.write_text("/etc/motd", "welcome\n")
    assert (host / "passwd").read_text() == "host passwd\n"
    assert not tree.is_symlink("/etc/motd")
    assert (tree.root / "etc/motd").read_text() == "welcome\n"
    info = os.lstat(tree.root / "etc/motd")
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o644


def test_parents_through_planted_links_stay_inside(tree: ImageTree, host: Path) -> None:
    # var/cache/apt/archives -> {host}: inside the image that is {root}{host}, which does
    # not exist: a link to nowhere holds no files.
    with pytest.raises(InvalidImage, match="symlink to nowhere"):
        tree.write_text("/var/cache/apt/archives/partial/x.deb", "image's own")
    assert sorted(p.name for p in host.iterdir()) == ["keep.deb", "passwd"]
    # Once the image has that directory, the write lands there, still inside.
    (tree.root / str(host).lstrip("/")).mkdir(parents=True)
    tree.write_text("/var/cache/apt/archives/partial/x.deb", "image's own")
    assert (tree.root / str(host).lstrip("/") / "partial/x.deb").read_text() == "image's own"
    assert sorted(p.name for p in host.iterdir()) == ["keep.deb", "passwd"]


def test_glob_and_unlink_do_not_touch_the_host(tree: ImageTree, host: Path) -> None:
    assert tree.glob("/var/cache/apt/archives", "*.deb") == []  # the host's keep.deb is not seen
    for path in tree.glob("/var/cache/apt", "*"):
        tree.unlink(path)
    assert (host / "keep.deb").read_bytes() == b"host file"
    assert not tree.is_symlink("/var/cache/apt/archives")  # the link itself went
    tree.unlink("/etc/motd")
    assert (host / "passwd").exists()


def test_empty_dir_follows_no_link(tree: ImageTree, host: Path) -> None:
    (tree.root / "tmp").mkdir()
    (tree.root / "tmp/out").symlink_to(str(host))
    (tree.root / "tmp/sub/deeper").mkdir(parents=True)
    (tree.root / "tmp/sub/deeper/f").write_text("x")
    tree.empty_dir("/tmp")
    assert list((tree.root / "tmp").iterdir()) == []
    assert sorted(p.name for p in host.iterdir()) == ["keep.deb", "passwd"]
    (tree.root / "tmp/keep").write_text("x")
    tree.empty_dir("/hostroot/tmp")  # "/" is the image's root: its own /tmp is emptied
    assert list((tree.root / "tmp").iterdir()) == []
    assert (host / "passwd").exists()


def test_special_files_are_not_opened(tree: ImageTree) -> None:
    os.mkfifo(tree.root / "etc/hostname")
    opened = threading.Event()

    def read() -> None:
        with pytest.raises(InvalidImage, match="not a regular file"):
            tree.read_text("/etc/hostname")
        opened.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert opened.is_set(), "reading a FIFO planted in the image blocked"
    os.mknod(tree.root / "etc/disk", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(InvalidImage, match="not a regular file"):
        tree.read_bytes("/etc/disk")
    tree.write_text("/etc/disk", "replaced, not written through\n")
    assert (tree.root / "etc/disk").read_text() == "replaced, not written through\n"


def test_reads_are_bounded(tree: ImageTree) -> None:
    (tree.root / "etc/big").write_bytes(b"x" * 2000)
    with pytest.raises(InvalidImage, match="larger than 1000 bytes"):
        tree.read_bytes("/etc/big", limit=1000)
    assert len(tree.read_bytes("/etc/big", limit=2000)) == 2000


def test_loops_and_odd_paths(tree: ImageTree) -> None:
    (tree.root / "loop").symlink_to("loop")
    assert not tree.exists("/loop")
    with pytest.raises(InvalidImage):
        tree.read_text("/loop")
    with pytest.raises(InvalidImage, match="must not end in"):
        tree.write_text("/etc/..", "x")
    with pytest.raises(InvalidImage, match="root"):
        tree.write_text("/", "x")
    with pytest.raises(InvalidImage, match="directory"):
        tree.write_text("/etc", "x")

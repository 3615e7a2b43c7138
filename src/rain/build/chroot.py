"""What is left of the build chroot: `inside_root`, for `rain.build.boot.install_boot_marker`.

Template steps no longer run in a chroot: they run in `rain.sandbox.Sandbox`
(user namespace, idmapped tree, pivot_root; see docs/sandbox.md), and
host-side work on an image tree goes through `rain.sandbox.ImageTree`.
`install_boot_marker` still joins paths under a root with this helper; it is
only called on a base image's own freshly bootstrapped tree. Once it uses
`ImageTree` too, this module goes.
"""

from __future__ import annotations

from pathlib import Path

from rain.model.errors import InvalidImage


def inside_root(root: Path, inside: str) -> Path:
    """`root` + `inside`, refusing a path whose existing parents in the image are symlinks.

    The last component may be a symlink; callers that write it decide.
    """
    parts = [p for p in inside.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidImage(f"path {inside!r} must not contain '..'")
    path = Path(root)
    for part in parts[:-1]:
        path = path / part
        if path.is_symlink():
            raise InvalidImage(f"{inside} in the image goes through a symlink ({path})")
    return path / parts[-1] if parts else path

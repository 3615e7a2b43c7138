"""Run untrusted steps on an image tree: user namespace, pivot_root, no host devices or
services, limits. See docs/sandbox.md.

`Sandbox` runs commands (each in a fresh sandbox); `ImageTree` is the
symlink-safe host-side access to the same tree; `SandboxConfig` is the
``[sandbox]`` section of rain.toml.

Names are imported on first use: the launcher (``python -m
rain.sandbox.launcher``, started for every command) then loads only the
standard library and `rain.sandbox.syscalls`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rain.sandbox.config import SandboxConfig
    from rain.sandbox.sandbox import Bind, Cancel, Sandbox, StepCancelled
    from rain.sandbox.tree import ImageTree

_WHERE = {
    "SandboxConfig": "rain.sandbox.config",
    "Bind": "rain.sandbox.sandbox",
    "Cancel": "rain.sandbox.sandbox",
    "Sandbox": "rain.sandbox.sandbox",
    "StepCancelled": "rain.sandbox.sandbox",
    "ImageTree": "rain.sandbox.tree",
}
__all__ = ["Bind", "Cancel", "ImageTree", "Sandbox", "SandboxConfig", "StepCancelled"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'rain.sandbox' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

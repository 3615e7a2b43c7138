"""rain's verdict and the oslo inspector's on one image, side by side."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rain.formats import inspect_file
from rain.formats.oslo_inspector import InspectorOpinion, opinion_of
from rain.model import DiskFormat
from rain.model.errors import InvalidImage

from .conftest import CAP


@dataclass(frozen=True)
class Row:
    rain: str  # "accept" or the refusal message: rain's own checks and qemu-img
    inspector: InspectorOpinion
    final: str  # with the inspector as a second opinion

    @property
    def rain_accepts(self) -> bool:
        return self.rain == "accept"

    @property
    def inspector_accepts(self) -> bool:
        """One format and no failed check; gpt+iso is the one double match oslo documents as
        legitimate (bootable ISOs), which Glance accepts as an ISO."""
        formats = set(self.inspector.formats)
        return (len(formats) == 1 or formats == {"gpt", "iso"}) and not (
            self.inspector.failures or self.inspector.error)


def verdict(path: Path, declared: DiskFormat | None, *, second_opinion: bool) -> str:
    try:
        inspect_file(path, declared=declared, max_virtual_size=CAP,
                     second_opinion=second_opinion)
    except InvalidImage as exc:
        return exc.message
    return "accept"


def compare(path: Path, declared: DiskFormat | None) -> Row:
    with path.open("rb") as f:
        fd = f.fileno()
        opinion = opinion_of(lambda offset, n: os.pread(fd, n, offset), os.fstat(fd).st_size)
    return Row(verdict(path, declared, second_opinion=False), opinion,
               verdict(path, declared, second_opinion=True))

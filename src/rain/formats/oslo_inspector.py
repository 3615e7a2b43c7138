"""oslo.utils' format inspector (Glance's, reviewed after CVE-2024-32498) as a second opinion.

rain's own header checks (`headers.py`) and qemu-img decide first; the
inspector then looks at the same bytes and may *refuse* what they accepted,
never accept what they refused. Its strength is spotting polyglots: it runs
every format's detector over the bytes and refuses a file that matches two
(a qcow2 header in an ISO's system area, a VMDK descriptor hiding in an MBR
disk), where rain's detection stops at the first signature that matches.
The comparison on a corpus of good and hostile images, and why each
difference is decided the way it is, is in docs/formats.md.

Where rain knows better, the inspector's refusal is overruled, by name:

- `unknown_features` on a qcow2 whose only feature the inspector does not know
  is extended L2 (incompatible bit 4; qemu ≥ 5.2 writes it with
  `extended_l2=on`): rain parses that bit itself and qemu-img checks the file.
- the `mbr` check of a raw disk (a partition table the inspector finds
  implausible): qemu never interprets an MBR, so it cannot make a raw disk
  unsafe; the inspector refuses, for instance, an MBR without partitions.
- format names within the raw family (raw, gpt, iso) agree with each other:
  their bytes are served as they are.

Reading is bounded: the inspector keeps at most ~1 MiB of captured regions,
and it is fed at most the first `HEAD_BYTES` unless a format needs its end (a
VMDK whose grain directory is in a footer), then the file in 1 MiB pieces.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from oslo_utils.imageutils import format_inspector as fi

from rain.model import DiskFormat
from rain.model.errors import InvalidImage

HEAD_BYTES = 4 << 20
PIECE = 1 << 20

RAW_FAMILY = frozenset({"raw", "gpt", "iso"})
# oslo's names for rain's formats.
OSLO_NAME = {
    DiskFormat.RAW: "raw",
    DiskFormat.ISO: "iso",
    DiskFormat.QCOW2: "qcow2",
    DiskFormat.VMDK: "vmdk",
    DiskFormat.VPC: "vhd",
    DiskFormat.VHDX: "vhdx",
    DiskFormat.VDI: "vdi",
}
_QCOW2_EXTENDED_L2 = 1 << 4

# The inspector logs a warning for every failed check; rain reports them itself.
logging.getLogger(fi.__name__).setLevel(logging.ERROR)


@dataclass(frozen=True)
class InspectorOpinion:
    """What the inspector concluded: a format (oslo's name) and its failed safety checks."""

    formats: tuple[str, ...]  # () when it could not decide; >1 when the file is a polyglot
    failures: dict[str, str]  # safety check name → reason
    error: str = ""  # the inspector could not parse the file as the format it matched
    virtual_size: int = 0

    @property
    def format(self) -> str | None:
        return self.formats[0] if len(self.formats) == 1 else None

    def summary(self) -> str:
        """One line for tables and logs: `qcow2`, `qcow2: backing_file`, `iso+qcow2` …"""
        name = "+".join(self.formats) or "?"
        problems = [*self.failures, *([self.error] if self.error else [])]
        return f"{name}: {', '.join(problems)}" if problems else name


def opinion_of(read_at: Callable[[int, int], bytes], total_size: int) -> InspectorOpinion:
    """Run every oslo inspector over an image readable with `read_at(offset, length)`."""
    stream = _Stream(read_at, total_size)
    wrapper = fi.InspectWrapper(stream)  # type: ignore[arg-type]
    stream.decided = lambda: wrapper.formats is not None
    try:
        while wrapper.read(PIECE):
            pass
        wrapper.close()
        return _conclude(wrapper)
    except Exception as exc:  # third-party parsing of hostile bytes: any failure is an opinion
        return InspectorOpinion((), {}, error=_one_line(exc))


def opinion_of_header(header: bytes) -> InspectorOpinion:
    """The opinion on the first bytes of an upload, as if they were the whole file."""
    return opinion_of(lambda offset, n: header[offset : offset + n], len(header))


class _Stream:
    """The image as the inspector wants it (a file read from the start), read no further
    than `HEAD_BYTES` once every inspector has decided; only a format that needs the end
    of the file (a VMDK with its grain directory in a footer) is fed the rest."""

    def __init__(self, read_at: Callable[[int, int], bytes], total: int) -> None:
        self.read_at = read_at
        self.total = total
        self.offset = 0
        self.decided: Callable[[], bool] = lambda: False

    def read(self, n: int) -> bytes:
        if self.offset >= self.total or (self.offset >= HEAD_BYTES and self.decided()):
            return b""
        piece = self.read_at(self.offset, min(n, self.total - self.offset))
        self.offset += len(piece)
        return piece


def _conclude(wrapper: fi.InspectWrapper) -> InspectorOpinion:
    matches = wrapper.formats or []
    names = tuple(sorted(str(m) for m in matches))
    if len(matches) != 1:
        return InspectorOpinion(names, {})
    inspector = matches[0]
    failures: dict[str, str] = {}
    try:
        inspector.safety_check()
    except fi.SafetyCheckFailed as exc:
        failures = {name: _one_line(reason) for name, reason in exc.failures.items()}
    return InspectorOpinion(names, failures, virtual_size=inspector.virtual_size)


def refuse_if_inspector_does(fmt: DiskFormat, opinion: InspectorOpinion, header: bytes) -> None:
    """Refuse an image rain accepted as `fmt` when the inspector has a reason rain lacks."""
    names = set(opinion.formats)
    if len(names) > 1 and not names <= RAW_FAMILY:
        raise InvalidImage(
            f"the content matches several formats ({', '.join(sorted(names))}); a file that is"
            " two formats at once is refused")
    if opinion.error:
        raise InvalidImage(f"the format inspector cannot parse the {fmt} image: {opinion.error}")
    seen = opinion.format or ("raw" if names and names <= RAW_FAMILY else None)
    expected = OSLO_NAME[fmt]
    raw_like = fmt in (DiskFormat.RAW, DiskFormat.ISO) or (
        fmt is DiskFormat.VPC and seen in RAW_FAMILY)  # a fixed VHD starts with plain data
    if seen is None or (seen != expected and not (raw_like and seen in RAW_FAMILY)):
        raise InvalidImage(f"the format inspector reads the content as {seen or 'nothing'},"
                           f" not {fmt}")
    failures = {k: v for k, v in opinion.failures.items() if not _overruled(k, seen, header)}
    if failures:
        checks = "; ".join(f"{k}: {v}" for k, v in sorted(failures.items()))
        raise InvalidImage(f"the format inspector refuses the {fmt} image ({checks})")


def _overruled(check: str, seen: str, header: bytes) -> bool:
    if check == "mbr" and seen == "gpt":
        return True
    if check == "unknown_features" and seen == "qcow2" and len(header) >= 80:
        (incompatible,) = struct.unpack_from(">Q", header, 72)
        return bool(incompatible & _QCOW2_EXTENDED_L2) and not incompatible & ~0x1F
    return False


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]

"""Disk image knowledge, safe against untrusted input.

Format detection from magic bytes, header checks that refuse images referring
to other files, qemu-img cross-checks and conversion, and copy-on-write
overlays. Every external tool runs through `rain.formats.tool.run_tool`.
"""

from rain.formats.detect import HEADER_BYTES, detect_format
from rain.formats.inspect import (
    ImageInfo,
    convert_file,
    inspect_file,
    inspect_header,
    verify_raw_header,
)
from rain.formats.overlay import create_copy, create_ephemeral, create_overlay
from rain.formats.tool import (
    CONVERT_LIMITS,
    DEFAULT_LIMITS,
    ToolExitError,
    ToolLimits,
    run_tool,
)

__all__ = [
    "CONVERT_LIMITS",
    "DEFAULT_LIMITS",
    "HEADER_BYTES",
    "ImageInfo",
    "ToolExitError",
    "ToolLimits",
    "convert_file",
    "create_copy",
    "create_ephemeral",
    "create_overlay",
    "detect_format",
    "inspect_file",
    "inspect_header",
    "run_tool",
    "verify_raw_header",
]

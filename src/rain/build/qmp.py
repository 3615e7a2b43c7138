"""Just enough QMP (QEMU's JSON monitor protocol) to ask whether a guest still runs.

A guest can stop without QEMU exiting: under KVM an instruction the kernel
cannot emulate ("KVM internal error. Suberror: 1") *pauses* the VM, and a boot
test that only watches the console and the process would wait for its whole
timeout. `QemuMonitor.status` asks QEMU itself (``query-status``), over the
unix socket ``-qmp unix:PATH,server=on,wait=off`` opens; events that arrive
in between (``STOP``, ``RESUME`` …) are skipped.
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

# Statuses of a guest that is on its way or running; any other one is stopped for good
# (QEMU pauses on internal errors; nothing in a boot test resumes it).
RUNNING_STATES = frozenset({"running", "prelaunch", "inmigrate", "restore-vm"})
_TIMEOUT = 2.0
_MAX_LINE = 1 << 20


class QemuMonitor:
    """A QMP client for one QEMU; `status()` is None until the socket is up."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._buffer = b""

    def status(self) -> str | None:
        """The guest's run state ('running', 'paused', 'internal-error', …), or None when
        QMP does not answer (not up yet, or QEMU gone)."""
        if self._sock is None and not self._connect():
            return None
        try:
            reply = self._call("query-status")
        except (OSError, ValueError):
            self.close()
            return None
        status = reply.get("status") if isinstance(reply, dict) else None
        return str(status) if status is not None else None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._buffer = b""

    def __enter__(self) -> QemuMonitor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _connect(self) -> bool:
        if not self.path.exists():
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(_TIMEOUT)
        try:
            sock.connect(str(self.path))
            self._sock = sock
            greeting = self._message()
            if "QMP" not in greeting:
                raise ValueError("not a QMP greeting")
            self._call("qmp_capabilities")
        except (OSError, ValueError):
            self.close()
            return False
        return True

    def _call(self, command: str) -> Any:
        assert self._sock is not None
        self._sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:
            message = self._message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise ValueError(str(message["error"].get("desc", message["error"])))
            # {"event": …}: not an answer

    def _message(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            data = self._sock.recv(65536)
            if not data:
                raise OSError("QMP closed")
            self._buffer += data
            if len(self._buffer) > _MAX_LINE:
                raise ValueError("QMP message too long")
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError("QMP message is not an object")
        return message

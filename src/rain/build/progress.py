"""What a running build reports, collected in memory and written to the catalog in batches.

A builder may report from any thread and as often as it likes (every line
of apt's output, a progress fraction per block): calls only append to a
buffer under a lock; the queue's flusher thread writes what changed about
twice a second — one UPDATE per build, the new log text appended in SQL.

It also carries the build's cancellation: `cancelled` is set when the build
is asked to stop (by this server at once, by another sharing the catalog
within a flush), and from then on `phase` and `progress` — which a builder
calls between its steps — raise `BuildCancelled`. `log` never raises: tools'
output is read by threads that must drain their pipes. A long step that
cannot wait for its next report is handed `cancelled` itself (e.g. as the
sandbox's `cancel` event, which kills the process tree).
"""

from __future__ import annotations

import threading
import time

from rain.catalog import Catalog
from rain.model.clock import utcnow
from rain.model.errors import BuildCancelled

PHASE_CHARS = 32


class CatalogProgress:
    """The build queue's `BuildProgress`: buffers reports, `flush()` writes them."""

    def __init__(self, catalog: Catalog, build_id: str, *, max_log_chars: int,
                 log_size: int = 0) -> None:
        self.catalog = catalog
        self.build_id = build_id
        self.max_log_chars = max_log_chars
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()
        # Held across the database write, so batches land in the order they were taken.
        self._flush_lock = threading.Lock()
        self._log: list[str] = []
        self._log_chars = log_size
        self._truncated = False
        self._phase: str | None = None
        self._progress: float | None = None
        self._timings_changed = False
        self._last_write = time.monotonic()
        self.cancelled = threading.Event()

    # -- BuildProgress ---------------------------------------------------------
    def check(self) -> None:
        """Raise BuildCancelled if the build was asked to stop."""
        if self.cancelled.is_set():
            raise BuildCancelled(f"build {self.build_id} was cancelled")

    def phase(self, name: str) -> None:
        self.check()
        with self._lock:
            self._phase = str(name)[:PHASE_CHARS]
            self._progress = 0.0

    def progress(self, fraction: float) -> None:
        self.check()
        with self._lock:
            self._progress = min(max(float(fraction), 0.0), 1.0)

    def log(self, line: str) -> None:
        # PostgreSQL text cannot hold NUL; tools' carriage-return redraws stay as they are.
        text = str(line).replace("\x00", "").rstrip("\n") + "\n"
        with self._lock:
            if self._truncated:
                return
            if self._log_chars + len(text) > self.max_log_chars:
                self._truncated = True
                text = f"[log truncated at {self.max_log_chars} characters]\n"
            self._log.append(text)
            self._log_chars += len(text)

    def timing(self, phase: str, seconds: float) -> None:
        """Seconds spent in `phase`; reported twice, the times add up."""
        with self._lock:
            self.timings[phase] = round(self.timings.get(phase, 0.0) + float(seconds), 3)
            self._timings_changed = True

    # -- writing ---------------------------------------------------------------
    def flush(self, *, heartbeat_every: float | None = None) -> None:
        """Write what changed; with `heartbeat_every`, also say "alive" if that long passed."""
        with self._flush_lock:
            self._flush(heartbeat_every)

    def _flush(self, heartbeat_every: float | None) -> None:
        with self._lock:
            text = "".join(self._log)
            self._log.clear()
            fields: dict[str, object] = {}
            if self._phase is not None:
                fields["phase"] = self._phase
            if self._progress is not None:
                fields["progress"] = self._progress
            if self._timings_changed:
                fields["timings"] = dict(self.timings)
            self._phase = self._progress = None
            self._timings_changed = False
        due = heartbeat_every is not None and time.monotonic() - self._last_write > heartbeat_every
        if not text and not fields and not due:
            return
        try:
            self.catalog.update_build(self.build_id, append_log=text, heartbeat=utcnow(),
                                      **fields)
        except Exception:
            with self._lock:  # try again with the next flush
                self._log.insert(0, text)
            raise
        self._last_write = time.monotonic()

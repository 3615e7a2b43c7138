"""Turns: the repository's stripe views send one piece at a time, not all at once.

With every view sending at once, each gets R_repo/N of the repository's link,
so no node holds a whole piece (the unit BitTorrent shares) before
N·piece/R_repo, and the last pieces of all stripes finish together at the
end, each with one owner that must serve all the others. In turns, `active`
views at a time send at full rate, each for one piece, round-robin in stripe
order: piece i then leaves the repository about i·piece/R_repo after the
start, every node has something to trade after one piece time, and at the end
only the last piece or two are rare.

A waiting view is not stopped but *trickles* (`trickle` bytes/s): a node that
gets no block from a peer it has asked for ~2 s (libtorrent's request timeout
on a fast link) snubs it and keeps one request queued, and the repository's
link would then sit idle at the view's next turn. The trickle's bytes are not
lost: they are the view's next pieces.

A view's turn ends when it has sent a piece's worth of bytes, or when it
cannot use the turn: its node is not connected (not yet, or dead) or it sent
nothing for `idle_turn` seconds (its node has the piece from elsewhere). A
view that has sent its whole stripe is done and no longer limited.

Measured in the testbed (docs/bittorrent.md) the turns did not make a
deployment faster: libtorrent's rate limits and byte counters are coarse
(seconds), a node keeps few requests queued at a peer that trickled, and at
N = 24 the node-to-node transfers, not the repository, set the pace. So
`view_turns` is 0 by default: every view at once. The seeder still uses
`Turns` with every view active to learn when every stripe is sent (the tail
seed).

This module knows nothing of libtorrent: `Lane` is what it needs of a view.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

UNLIMITED = 0  # libtorrent's "no limit"


@dataclass
class Lane:
    """One view of one torrent, as the scheduler sees it."""

    limit: Callable[[int], None]  # set its upload limit (bytes/s, 0: none)
    stripe_bytes: int  # bytes of its stripe's pieces
    base: int = 0  # `last_sent` when the schedule began
    turn_start: int = 0  # `last_sent` when its current turn began
    last_sent: int = 0  # payload bytes the view's torrent has sent, all time
    connected: bool = False  # its node is connected
    last_change: float = 0.0
    done: bool = False
    current: int = -1  # the limit last set (-1: none yet)

    def set_limit(self, rate: int) -> None:
        if rate != self.current:
            self.limit(rate)
            self.current = rate


@dataclass
class Turns:
    """Round-robin turns over one torrent's views: `tick(now, seen)` every ~0.1 s, with
    (bytes sent all time, node connected) of every view."""

    lanes: Sequence[Lane]
    piece: int  # bytes a view sends per turn
    active: int = 1  # views sending at full rate at once
    trickle: int = 16 * 1024
    idle_turn: float = 1.5
    _queue: deque[int] = field(default_factory=deque)  # views waiting, next first
    _running: list[int] = field(default_factory=list)
    started: bool = False
    ended: dict[str, int] = field(default_factory=dict)  # turns by how they ended

    def start(self, now: float, seen: Sequence[tuple[int, bool]]) -> None:
        for lane, (sent, _) in zip(self.lanes, seen, strict=True):
            lane.base = lane.last_sent = lane.turn_start = sent
            lane.last_change = now
            lane.set_limit(self.trickle)
        self._queue.extend(range(len(self.lanes)))
        self.started = True
        self.tick(now, seen)

    @property
    def finished(self) -> bool:
        return all(lane.done for lane in self.lanes)

    def running(self) -> list[int]:
        return list(self._running)

    def tick(self, now: float, seen: Sequence[tuple[int, bool]]) -> None:
        if not self.started:
            self.start(now, seen)
            return
        for i, (lane, (sent, connected)) in enumerate(zip(self.lanes, seen, strict=True)):
            lane.connected = connected
            if sent != lane.last_sent:
                lane.last_sent, lane.last_change = sent, now
            if not lane.done and sent - lane.base >= lane.stripe_bytes:
                lane.done = True
                lane.set_limit(UNLIMITED)
                if i in self._running:
                    self._running.remove(i)
        for i in list(self._running):
            lane = self.lanes[i]
            how = "piece" if lane.last_sent - lane.turn_start >= self.piece else \
                "gone" if not lane.connected else \
                "idle" if now - lane.last_change >= self.idle_turn else ""
            if how:
                self.ended[how] = self.ended.get(how, 0) + 1
                self._running.remove(i)
                lane.set_limit(self.trickle)
                self._queue.append(i)
        # Fill the free slots with the next views that can use a turn (one pass at most:
        # views whose nodes are not connected wait for the next round).
        for _ in range(len(self._queue)):
            if len(self._running) >= self.active:
                break
            i = self._queue.popleft()
            lane = self.lanes[i]
            if lane.done:
                continue
            if not lane.connected:
                self._queue.append(i)
                continue
            lane.turn_start = lane.last_sent
            lane.last_change = now
            lane.set_limit(UNLIMITED)
            self._running.append(i)

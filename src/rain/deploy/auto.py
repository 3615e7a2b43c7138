"""`--method auto`: pick a transfer method from what the deployment's nodes already hold.

The rule, from the measurements in docs/benchmarks.md:

1. Nothing to move (every node caches the image): `cache`.
2. Every node that lacks the image already holds most of its data in other
   cached images (a derived image over a cached base): `chunks` moves only
   the difference.
3. One node: `http` — there is nobody to share with.
4. More nodes: `tree`. It and `bittorrent` both use every node's upload, so
   the time stays near one image's transfer time whatever the number of
   nodes, where http grows with it; in the testbed (128 MiB) the striped tree
   was 1.09–1.21 × the lower bound from 4 to 24 nodes, BitTorrent 1.25–2.27 ×
   (whole 4 MiB pieces before a node can pass anything on), with the same
   repository bytes (docs/benchmarks.md). `multicast` was as close (1.11–1.19 ×)
   but needs a network that carries multicast, which `auto` cannot know.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rain.model import TransferMethod

CHUNKS_OVERLAP = 0.5  # fraction of the image's data a node must already hold


def choose_method(
    requested: str, need: Sequence[str], overlap: Callable[[str], float]
) -> tuple[str, str]:
    """(method, why) for the nodes in `need`; `overlap(node)` is the fraction of the
    image's data bytes that node already holds in its cache."""
    if requested != TransferMethod.AUTO:
        return requested, "asked for"
    if not need:
        return str(TransferMethod.CACHE), "every node caches the image"
    least = min(overlap(n) for n in need)
    if least >= CHUNKS_OVERLAP:
        return str(TransferMethod.CHUNKS), (f"every node lacking the image holds at least "
                                            f"{least:.0%} of its data already")
    if len(need) == 1:
        return str(TransferMethod.HTTP), "one node: nobody to share with"
    return str(TransferMethod.TREE), f"{len(need)} nodes share the upload (striped tree)"

"""What one placement asks for, as filters and weighers see it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PlacementRequest:
    """One image to start instances of; `image_size` (bytes) is 0 when unknown.

    `placed` counts, by node name, the instances of this same request already
    placed by earlier picks (the placer fills it in as it goes): what tells a
    node chosen by this deployment from one loaded by others.
    """

    image_id: str
    image_size: int = 0
    placed: Mapping[str, int] = field(default_factory=dict, hash=False, compare=False)

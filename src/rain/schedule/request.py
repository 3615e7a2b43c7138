"""What one placement asks for, as filters and weighers see it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlacementRequest:
    """One image to start instances of; `image_size` (bytes) is 0 when unknown."""

    image_id: str
    image_size: int = 0

"""Image torrents: the BitTorrent metainfo of an image's stored content, one per image."""

from __future__ import annotations

from sqlalchemy import delete

from rain.catalog.db import Database
from rain.catalog.schema import TorrentRow
from rain.model.clock import utcnow


class TorrentCatalog:
    db: Database

    def put_torrent(self, image_id: str, info_hash: str, piece_size: int, data: bytes) -> None:
        """Store (or replace) the torrent of `image_id`."""
        with self.db.session() as s:
            s.merge(TorrentRow(image_id=image_id, info_hash=info_hash, piece_size=piece_size,
                               torrent=bytes(data), created=utcnow()))

    def get_torrent(self, image_id: str) -> tuple[str, int, bytes] | None:
        """(info hash, piece size, bencoded torrent), or None."""
        with self.db.session() as s:
            row = s.get(TorrentRow, image_id)
            return (row.info_hash, row.piece_size, bytes(row.torrent)) if row else None

    def drop_torrent(self, image_id: str) -> None:
        with self.db.session() as s:
            s.execute(delete(TorrentRow).where(TorrentRow.image_id == image_id))

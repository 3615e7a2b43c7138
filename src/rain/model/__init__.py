"""Plain data shared by every room of rain: no behaviour, no rain imports."""

from rain.model.errors import (
    Conflict,
    Forbidden,
    InvalidImage,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    RainError,
    StoreCorruption,
    ToolFailed,
    Unauthorized,
)
from rain.model.image import (
    DiskFormat,
    Image,
    ImageStatus,
    Member,
    UsageRecord,
    User,
    Visibility,
)

__all__ = [
    "Conflict",
    "DiskFormat",
    "Forbidden",
    "Image",
    "ImageStatus",
    "InvalidImage",
    "InvalidRequest",
    "Member",
    "NotFound",
    "QuotaExceeded",
    "RainError",
    "StoreCorruption",
    "ToolFailed",
    "Unauthorized",
    "UsageRecord",
    "User",
    "Visibility",
]

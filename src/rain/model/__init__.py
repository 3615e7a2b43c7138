"""Plain data shared by every room of rain: no behaviour, no rain imports."""

from rain.model.build import ACTIVE_BUILD_STATUSES, Build, BuildStatus
from rain.model.errors import (
    Conflict,
    Forbidden,
    ImageRebuilding,
    InvalidImage,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    RainError,
    StoreCorruption,
    ToolFailed,
    Unauthorized,
    Unavailable,
    Unsupported,
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
from rain.model.node import NodeState, Placement

__all__ = [
    "ACTIVE_BUILD_STATUSES",
    "Build",
    "BuildStatus",
    "Conflict",
    "DiskFormat",
    "Forbidden",
    "Image",
    "ImageRebuilding",
    "ImageStatus",
    "InvalidImage",
    "InvalidRequest",
    "Member",
    "NodeState",
    "NotFound",
    "Placement",
    "QuotaExceeded",
    "RainError",
    "StoreCorruption",
    "ToolFailed",
    "Unauthorized",
    "Unavailable",
    "Unsupported",
    "UsageRecord",
    "User",
    "Visibility",
]

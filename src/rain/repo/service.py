"""The repository: store + catalog + formats behind one permission-checked API.

Every method takes the acting user (`viewer`, None = anonymous) first. Images
are resolved through the viewer's visibility, so an image they may not see is
always NotFound — never Forbidden, which would confirm it exists.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rain.catalog import Catalog, ImageQuery, MatchReport, Preference, Requirements
from rain.formats import ToolLimits
from rain.model import (
    Conflict,
    DiskFormat,
    Forbidden,
    Image,
    ImageStatus,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    Unauthorized,
    UsageRecord,
    User,
    Visibility,
)
from rain.model.clock import utcnow
from rain.repo import metadata
from rain.repo.access import (
    refuse_node,
    require_admin,
    require_modify,
    require_readable_data,
    require_user,
)
from rain.repo.builds import BuildRecords
from rain.repo.config import RepoConfig
from rain.repo.convert import materialize, variant_for
from rain.repo.credentials import Credentials, TokenAdmin
from rain.repo.detect import detect_and_record, forget_detected
from rain.repo.distribution import ImageDistribution
from rain.repo.rebuild import PurgeAndRebuild, Rebuilder, feed_file
from rain.repo.slots import UploadSlots
from rain.repo.upload import UploadLimits, UploadResult, UploadSession, stream_into_store
from rain.repo.users import UserAdmin
from rain.store import (
    ChunkStore,
    FilesystemBackend,
    GcReport,
    ImageManifest,
    ImageReader,
    StoreConfig,
    collect,
)

CREATE_FIELDS = {"name", "version", "description", "visibility", "os_distro", "os_release",
                 "arch", "tags", "properties", "packages", "parent", "base", "protected",
                 "disk_format"}
UPDATE_FIELDS = {"name", "version", "description", "visibility", "os_distro", "os_release",
                 "arch", "add_tags", "remove_tags", "properties", "remove_properties", "base",
                 "protected", "deactivated"}


@dataclass
class Download:
    """An image the viewer may pull now, in the format asked for; read it through here."""

    image: Image
    manifest: ImageManifest
    disk_format: DiskFormat
    sha256: str
    size: int
    _store: ChunkStore = field(repr=False)

    def reader(self) -> ImageReader:
        return ImageReader(self._store, self.manifest, image=self.image.id)

    def save(self, path: Path) -> None:
        """Write it to a sparse local file (zero chunks become holes)."""
        materialize(self._store, self.manifest, path, self.image.id)


class Repository(PurgeAndRebuild, ImageDistribution, Credentials):
    def __init__(self, catalog: Catalog, store: ChunkStore, config: RepoConfig,
                 work_dir: Path) -> None:
        self.catalog = catalog
        self.store = store
        self.config = config
        self.work_dir = work_dir
        # Set by the server when it runs a build queue: rebuilds purged images on pull.
        self.rebuilder: Rebuilder | None = None
        # Called with each image that becomes active (an upload or a rebuild ended), after
        # the fact: a failing hook is logged and fails nothing. They run in the thread that
        # finished the upload, before its response: a hook with real work to do (hashing
        # a torrent) hands it to a thread of its own.
        self.activation_hooks: list[Callable[[Image], None]] = []
        self.upload_slots = UploadSlots(config)  # uploads in progress, per user and in all
        self.build_records = BuildRecords(self)  # the build queue's side of the repository
        self.users = UserAdmin(catalog)  # users and groups, for the admin routes
        self.tokens = TokenAdmin(catalog)

    @classmethod
    def open(cls, data_dir: Path, db_url: str, store_config: StoreConfig | None = None,
             config: RepoConfig | None = None) -> Repository:
        data_dir.mkdir(parents=True, exist_ok=True)  # a SQLite catalog may live in it
        return cls.over(Catalog(db_url), data_dir, store_config, config)

    @classmethod
    def over(cls, catalog: Catalog, data_dir: Path, store_config: StoreConfig | None = None,
             config: RepoConfig | None = None) -> Repository:
        """The repository over a database its opener keeps a handle on: the server hands
        the same one to rain.deploy, whose tables the nodes and deployments are."""
        data_dir.mkdir(parents=True, exist_ok=True)
        store = ChunkStore(FilesystemBackend(data_dir / "store"), store_config)
        return cls(catalog, store, config or RepoConfig(), data_dir / "tmp")

    def close(self) -> None:
        self.catalog.close()
        self.store.close()

    @property
    def _tool_limits(self) -> ToolLimits:
        return ToolLimits(cpu_seconds=self.config.inspect_cpu_seconds,
                          memory_bytes=self.config.inspect_memory_bytes)

    # -- users -------------------------------------------------------------
    def authenticate(self, token: str | None) -> User | None:
        if not token:
            return None
        user = self.catalog.user_for_token(token)
        if user is None:
            raise Unauthorized("invalid token")
        if user.disabled:
            raise Unauthorized(f"user disabled: {user.name}'s tokens are refused until an "
                               "admin enables the user again")
        return user

    def bootstrap_admin(self) -> str | None:
        """On first start, create `admin` and return its token (None if users exist)."""
        if self.catalog.count_users():
            return None
        self.catalog.create_user("admin", admin=True)
        return self.catalog.issue_token("admin", "bootstrap")

    def create_user(self, viewer: User | None, name: str, *, admin: bool = False,
                    groups: list[str] | None = None, quota_bytes: int | None = None,
                    quota_images: int | None = None) -> tuple[User, str]:
        require_admin(viewer)
        return self._create_user(name, admin=admin, groups=groups, quota_bytes=quota_bytes,
                                 quota_images=quota_images)

    def _create_user(self, name: str, *, admin: bool = False, groups: list[str] | None = None,
                     quota_bytes: int | None = None,
                     quota_images: int | None = None) -> tuple[User, str]:
        user = self.catalog.create_user(
            name, admin=admin, groups=groups,
            quota_bytes=self.config.default_quota_bytes if quota_bytes is None else quota_bytes,
            quota_images=(self.config.default_quota_images if quota_images is None
                          else quota_images))
        return user, self.catalog.issue_token(name, "created")

    def local_create_user(self, name: str, **kw: Any) -> tuple[User, str]:
        """For `rain admin create-user`, which runs with direct access to the database."""
        return self._create_user(name, **kw)

    # -- reading -----------------------------------------------------------
    def get(self, viewer: User | None, ref: str) -> Image:
        self._require_read(viewer)
        return self.catalog.resolve(ref, viewer)

    def search(self, viewer: User | None, query: ImageQuery) -> tuple[list[Image], int]:
        self._require_read(viewer)
        if query.parent:  # a reference like any other (docs/api.md, References)
            query.parent = self.catalog.resolve(query.parent, viewer).id
        return self.catalog.search(query, viewer)

    def match(self, viewer: User | None, req: Requirements,
              prefs: list[Preference], limit: int = 20) -> MatchReport:
        self._require_read(viewer)
        return self.catalog.match_report(req, prefs, viewer, limit)

    def _require_read(self, viewer: User | None) -> None:
        refuse_node(viewer)
        if viewer is None and not self.config.anonymous_read:
            require_user(viewer)

    # -- creating and uploading ----------------------------------------------
    def create(self, viewer: User | None, meta: dict[str, Any], *,
               internal: bool = False) -> Image:
        """A queued image record. `internal`: the server's own callers (the builder), which
        may write the reserved `rain.*` properties and tags (rain.repo.metadata)."""
        user = require_user(viewer)
        unknown = set(meta) - CREATE_FIELDS - ({"template_digest"} if internal else set())
        if unknown:
            raise InvalidRequest(f"unknown image fields: {', '.join(sorted(unknown))}")
        _, count = self.catalog.usage_totals(user.id)
        if user.quota_images is not None and count >= user.quota_images:
            raise QuotaExceeded(f"user {user.name!r} has reached the quota of "
                                f"{user.quota_images} images")
        fields = _checked_fields(meta)
        if meta.get("template_digest") is not None:
            fields["template_digest"] = str(meta["template_digest"])
        fields["visibility"] = _visibility(meta.get("visibility", "private"))
        if meta.get("disk_format"):
            fields["disk_format"] = str(_disk_format(meta["disk_format"]))
        fields["is_base"] = bool(meta.get("base", False))
        fields["protected"] = bool(meta.get("protected", False))
        if meta.get("parent"):
            fields["parent_id"] = self.catalog.resolve(str(meta["parent"]), user).id
        name = metadata.check_name(meta.get("name", ""))
        tags = metadata.check_tags(meta.get("tags") or [], internal=internal)
        properties = metadata.check_properties(meta.get("properties") or {}, internal=internal)
        packages = metadata.check_packages(meta.get("packages") or {})
        version = fields.get("version", "")
        if version:
            existing, _ = self.catalog.search(
                ImageQuery(name=name, owner=user.name,
                           status=["queued", "saving", "active", "deactivated"], limit=1000),
                user)
            if any(i.version == version for i in existing):
                raise Conflict(f"you already have an image {name}:{version}; "
                               "images are write-once, push a new version")
        return self.catalog.create_image(user, name=name, tags=tags, properties=properties,
                                         packages=packages, **fields)

    def begin_upload(self, viewer: User | None, ref: str, declared: DiskFormat | None = None,
                     *, size: int | None = None, counted: bool = True,
                     interrupt: Callable[[], None] | None = None) -> tuple[Image, UploadSession]:
        """Claim a queued image for upload (queued → saving) and set up its session.

        A `counted` upload (a client's) counts against `max_uploads_per_user` /
        `max_uploads` until `end_upload` (429 beyond); a declared `size` over
        `max_image_size` is refused (413) before any byte is read. `interrupt` is
        called while the upload waits for its own work: it raises to end the upload
        (client gone, server stopping).
        """
        image = self.catalog.resolve(ref, require_user(viewer))
        require_modify(viewer, image, "upload data to")
        state = image.status if image.status != ImageStatus.QUEUED else "being uploaded"
        conflict = Conflict(f"image {image.id} is {state}, not queued: images are "
                            "write-once, push a new image instead")
        if image.status != ImageStatus.QUEUED:
            raise conflict
        if counted:
            self.upload_slots.acquire(require_user(viewer).name, image.id)
        claimed = False
        try:
            claimed = self.catalog.transition(image.id, [ImageStatus.QUEUED],
                                              ImageStatus.SAVING)
        finally:
            if counted and not claimed:
                self.upload_slots.release(image.id)
        if not claimed:
            raise conflict
        try:
            session = self._upload_session(image, declared or image.disk_format, interrupt)
            if size is not None:
                session.expect_size(size)
        except BaseException:
            self.end_upload(image, None)
            raise
        return image, session

    def _upload_session(self, image: Image, declared: DiskFormat | None,
                        interrupt: Callable[[], None] | None = None) -> UploadSession:
        owner = self.catalog.get_user(image.owner)
        used, _ = self.catalog.usage_totals(owner.id)
        quota_left = None if owner.quota_bytes is None else max(owner.quota_bytes - used, 0)
        limits = UploadLimits(self.config.max_virtual_size, quota_left, owner.name,
                              self._tool_limits, max_image_size=self.config.max_image_size)
        return UploadSession(self.store, declared=declared, limits=limits,
                             spool_dir=self.work_dir, interrupt=interrupt)

    def end_upload(self, image: Image, result: UploadResult | None) -> Image:
        """saving → active with the stored data, or → killed when `result` is None."""
        self.upload_slots.release(image.id)  # its work is done
        if result is None:
            self.catalog.transition(image.id, [ImageStatus.SAVING], ImageStatus.KILLED)
            return image
        ok = self.catalog.transition(
            image.id, [ImageStatus.SAVING], ImageStatus.ACTIVE, sha256=result.manifest.sha256,
            size=result.manifest.size, virtual_size=result.virtual_size,
            disk_format=str(result.disk_format), stored_bytes=result.stored_bytes,
            manifest_id=result.manifest_id)
        if not ok:
            raise Conflict(f"image {image.id} changed state during the upload")
        active = detect_and_record(self.catalog, self.store, self.catalog.get_image(image.id),
                                   result.manifest)
        self.run_activation_hooks(active)
        return active

    async def upload(self, viewer: User | None, ref: str, body: AsyncIterator[bytes],
                     declared: DiskFormat | None = None, size: int | None = None) -> Image:
        image, session = self.begin_upload(viewer, ref, declared, size=size)
        try:
            result = await stream_into_store(session, body)
        except BaseException:
            self.end_upload(image, None)
            raise
        # Off the event loop: ending an upload runs the activation hooks.
        return await asyncio.to_thread(self.end_upload, image, result)

    def upload_file(self, viewer: User | None, ref: str, path: Path,
                    declared: DiskFormat | None = None) -> Image:
        """Upload a local file into a queued image, synchronously (builders use this).

        Not counted against the uploads in progress: builds are bounded by
        `[build] max_concurrent`, and one must not fail at its very end for a push."""
        image, session = self.begin_upload(viewer, ref, declared, counted=False)
        try:
            result = feed_file(session, path)
        except BaseException:
            self.end_upload(image, None)
            raise
        return self.end_upload(image, result)

    # -- downloading ---------------------------------------------------------
    def readable_image(self, viewer: User | None, ref: str) -> Image:
        """The image `ref`, if the viewer may pull its data now (a purged one starts its
        rebuild and raises ImageRebuilding)."""
        self._require_read(viewer)
        image = self.catalog.resolve(ref, viewer)
        if image.status == ImageStatus.PURGED:
            raise self._rebuilding(image)  # 503 with the rebuild's build id
        if image.status not in (ImageStatus.ACTIVE, ImageStatus.DEACTIVATED):
            raise Conflict(f"image {image.id} is {image.status} and has no data to pull")
        require_readable_data(viewer, image)
        return image

    def open_download(self, viewer: User | None, ref: str,
                      fmt: DiskFormat | None = None) -> Download:
        image = self.readable_image(viewer, ref)
        manifest_id = self.catalog.manifest_id(image.id)
        assert manifest_id and image.disk_format
        # An ISO image is raw bytes, so it can be pulled as raw; a raw disk is no ISO 9660
        # image, so asking for iso goes on to the converter, which refuses it.
        if fmt is None or fmt == image.disk_format or (
                fmt == DiskFormat.RAW and image.disk_format == DiskFormat.ISO):
            manifest = self.store.get_manifest(manifest_id)
            return Download(image, manifest, image.disk_format, manifest.sha256, manifest.size,
                            self.store)
        variant = variant_for(self.catalog, self.store, image, manifest_id, fmt, self.work_dir)
        manifest = self.store.get_manifest(variant.manifest_id)
        return Download(image, manifest, fmt, variant.sha256, variant.size, self.store)

    async def open_download_async(self, viewer: User | None, ref: str,
                                  fmt: DiskFormat | None = None) -> Download:
        return await asyncio.to_thread(self.open_download, viewer, ref, fmt)

    def record_pull(self, viewer: User | None, image: Image, nbytes: int, *,
                    fresh: bool) -> None:
        now = utcnow()
        self.catalog.record_usage(image.id, viewer.id if viewer else None, "pull", nbytes, now)
        if fresh:
            self.catalog.record_access(image.id, now)

    # -- changing ------------------------------------------------------------
    def update(self, viewer: User | None, ref: str, changes: dict[str, Any]) -> Image:
        image = self.catalog.resolve(ref, require_user(viewer))
        require_modify(viewer, image)
        unknown = set(changes) - UPDATE_FIELDS
        if unknown:
            raise InvalidRequest(f"unknown fields: {', '.join(sorted(unknown))}")
        fields = _checked_fields(changes)
        if changes.get("name") is not None:
            fields["name"] = metadata.check_name(changes["name"])
        if changes.get("visibility") is not None:
            fields["visibility"] = _visibility(changes["visibility"])
        if changes.get("protected") is not None:
            fields["protected"] = bool(changes["protected"])
        if changes.get("base") is not None:
            fields["is_base"] = bool(changes["base"])
        add_tags = metadata.check_tags(changes.get("add_tags") or [])
        remove_tags = metadata.check_tags(changes.get("remove_tags") or [])
        metadata.total_after(image.tags, add_tags, remove_tags, metadata.MAX_TAGS, "tags")
        props = metadata.check_properties(changes.get("properties") or {})
        unset = metadata.check_property_keys(changes.get("remove_properties") or [])
        metadata.total_after(image.properties, props, unset, metadata.MAX_PROPERTIES,
                             "properties")
        if fields:
            self.catalog.update_image(image.id, **fields)
            forget_detected(self.catalog, image, set(fields))
        if add_tags or remove_tags:
            self.catalog.edit_tags(image.id, add_tags, remove_tags)
        if props or unset:
            self.catalog.edit_properties(image.id, props, unset)
        if changes.get("deactivated") is not None:
            self._set_active(image, not changes["deactivated"])
        return self.catalog.get_image(image.id)

    def rescan(self, viewer: User | None, ref: str) -> Image:
        """Read OS, release, arch and packages again from a stored image (owner or admin)."""
        image = self.catalog.resolve(ref, require_user(viewer))
        require_modify(viewer, image, "rescan")
        manifest_id = self.catalog.manifest_id(image.id)
        if image.status not in (ImageStatus.ACTIVE, ImageStatus.DEACTIVATED) or not manifest_id:
            raise Conflict(f"image {image.id} is {image.status} and has no data to read")
        return detect_and_record(self.catalog, self.store, image,
                                 self.store.get_manifest(manifest_id))

    def _set_active(self, image: Image, active: bool) -> None:
        src, dst = ((ImageStatus.DEACTIVATED, ImageStatus.ACTIVE) if active
                    else (ImageStatus.ACTIVE, ImageStatus.DEACTIVATED))
        if image.status == dst:
            return
        if not self.catalog.transition(image.id, [src], dst):
            raise Conflict(f"image {image.id} is {image.status}; only active images can be "
                           "deactivated and only deactivated ones reactivated")

    def share(self, viewer: User | None, ref: str, *, user: str | None = None,
              group: str | None = None) -> Image:
        image = self.catalog.resolve(ref, require_user(viewer))
        require_modify(viewer, image, "share")
        self.catalog.add_member(image.id, user=user, group=group)
        if image.visibility == Visibility.PRIVATE:
            self.catalog.update_image(image.id, visibility=Visibility.SHARED)
        return self.catalog.get_image(image.id)

    def unshare(self, viewer: User | None, ref: str, *, user: str | None = None,
                group: str | None = None) -> Image:
        image = self.catalog.resolve(ref, require_user(viewer))
        require_modify(viewer, image, "unshare")
        if not self.catalog.remove_member(image.id, user=user, group=group):
            raise NotFound(f"image {image.id} is not shared with {user or group!r}")
        return self.catalog.get_image(image.id)

    def delete(self, viewer: User | None, ref: str, *, force: bool = False) -> Image:
        """Delete an image; refused (409) while images derive from it or live instance
        disks are backed by it, unless `force`."""
        image = self.catalog.resolve(ref, require_user(viewer))
        require_modify(viewer, image, "delete")
        if image.protected:
            raise Forbidden(f"image {image.id} is protected; unprotect it before deleting")
        if not force:
            self._refuse_if_depended_on(viewer, image)
        self.catalog.transition(image.id, [s for s in ImageStatus if s != ImageStatus.DELETED],
                                ImageStatus.DELETED)
        self.catalog.drop_variants(image.id)
        image.status = ImageStatus.DELETED
        return image

    def _refuse_if_depended_on(self, viewer: User | None, image: Image) -> None:
        children = self.catalog.child_ids(image.id)
        live = self.catalog.live_instance_counts(image.id)
        if not children and not live:
            return
        reasons = []
        visible = self.catalog.visible_image_ids(children, viewer)
        seen = [c for c in children if c in visible]
        if children:
            shown = [f"{c[:8]} {self.catalog.get_image(c).name}" for c in seen[:5]]
            if len(seen) > 5:
                shown.append(f"{len(seen) - 5} more")
            if len(children) > len(seen):
                shown.append(f"{len(children) - len(seen)} you cannot see")
            reasons.append(f"it is the parent of {len(children)} image"
                           f"{'s' if len(children) != 1 else ''} ({', '.join(shown)})")
        if live:
            total = sum(live.values())
            where = ", ".join(f"{n} on {node}" for node, n in sorted(live.items()))
            reasons.append(f"it backs {total} live instance{'s' if total != 1 else ''} "
                           f"({where})")
        raise Conflict(f"image {image.id} was not deleted: {'; '.join(reasons)}; delete those "
                       "first, or force it (rain rm --force, API ?force=true)",
                       details={"children": seen, "children_total": len(children),
                                "live_instances": sum(live.values())})

    # -- usage and maintenance ------------------------------------------------
    def usage(self, viewer: User | None, ref: str | None = None, user: str | None = None,
              since: datetime | None = None) -> list[UsageRecord]:
        me = require_user(viewer)
        if ref:
            image = self.catalog.resolve(ref, me)
            # Who else pulled an image is the owner's (or an admin's) business.
            who = user if (me.is_admin or me.name == image.owner) else me.name
            return self.catalog.usage(image_id=image.id, user=who, since=since)
        if user and user != me.name and not me.is_admin:
            raise Forbidden("only an admin may see another user's usage")
        return self.catalog.usage(user=user or (None if me.is_admin else me.name), since=since)

    def gc(self, viewer: User | None = None, *, local: bool = False,
           grace_seconds: float | None = None) -> GcReport:
        if not local:
            require_admin(viewer)
        grace = self.config.gc_grace_seconds if grace_seconds is None else grace_seconds
        # Uploads whose server died mid-way never finish: after the grace period they are killed.
        stale, _ = self.catalog.search(ImageQuery(status=["saving", "queued"], limit=1000),
                                       User(0, "gc", is_admin=True))
        cutoff = utcnow() - timedelta(seconds=grace)
        for image in stale:
            if image.updated and image.updated < cutoff:
                self.catalog.transition(image.id, [ImageStatus.SAVING], ImageStatus.KILLED)
        return collect(self.store, self.catalog.live_manifest_ids(), grace_seconds=grace)


def _checked_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """version, description, os_distro, os_release, arch: those given, checked."""
    fields: dict[str, Any] = {}
    if meta.get("version") is not None:
        fields["version"] = metadata.check_version(meta["version"])
    if meta.get("description") is not None:
        fields["description"] = metadata.check_description(meta["description"])
    for key in ("os_distro", "os_release", "arch"):
        if meta.get(key) is not None:
            fields[key] = metadata.check_os_field(key, meta[key])
    return fields


def _visibility(value: Any) -> Visibility:
    try:
        return Visibility(str(value))
    except ValueError:
        raise InvalidRequest(f"bad visibility {value!r}: use private, shared or public") from None


def _disk_format(value: Any) -> DiskFormat:
    try:
        return DiskFormat(str(value))
    except ValueError:
        raise InvalidRequest(f"unknown disk format {value!r}: use one of "
                             f"{', '.join(f.value for f in DiskFormat)}") from None

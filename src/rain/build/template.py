"""Templates: parse and validate the YAML a user writes, and digest what it means.

A template says *what* an image contains (base, arch, packages, files,
services, commands, size). Its canonical digest identifies "the same image":
two templates with the same digest build the same content, however their keys,
unordered lists or names differ, so a build can be skipped when an active image
with that digest already exists.

Every problem is reported as one `InvalidRequest` line that names the source,
the line and the problem, e.g. ``hpc.yaml line 7: unknown key 'pakages' (did
you mean 'packages'?)``. Line numbers come from the composed YAML node tree.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from rain.model.errors import InvalidRequest
from rain.model.units import parse_size
from rain.repo.metadata import check_name, check_version

TEMPLATE_KEYS: tuple[str, ...] = (
    "name",
    "version",
    "description",
    "from",
    "arch",
    "packages",
    "files",
    "services",
    "run",
    "size",
)
SERVICE_KEYS: tuple[str, ...] = ("enable", "disable")
ARCHES: tuple[str, ...] = ("amd64", "arm64", "i386", "armhf", "ppc64el", "s390x", "riscv64")
DEFAULT_ARCH = "amd64"

GIB = 1024**3
MIN_SIZE = GIB
MAX_SIZE = 2 * 1024**4
DEFAULT_SIZE = 4 * GIB

# Bump when the meaning of the canonical form changes, so old and new digests
# can never collide.
CANONICAL_SCHEMA = 1

# Release knowledge per distribution; moves to one module per distro
# (rain/build/distros/debian.py) once builders exist.
DISTRO_RELEASES: dict[str, dict[str, str]] = {
    "debian": {
        "10": "buster",
        "11": "bullseye",
        "12": "bookworm",
        "13": "trixie",
        "14": "forky",
    },
}
DISTRO_CODENAMES: dict[str, frozenset[str]] = {
    "debian": frozenset({"buster", "bullseye", "bookworm", "trixie", "forky", "sid"}),
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_PACKAGE_VERSION_RE = re.compile(r"^[0-9][A-Za-z0-9.+~:-]*$")
_SERVICE_RE = re.compile(r"^[A-Za-z0-9@._:\\-]+$")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_IMAGE_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_FORBIDDEN_ROOTS = ("proc", "sys", "dev")


@dataclass(frozen=True)
class BaseRef:
    """What a template starts from (its `from:` key).

    kind="distro": `distro` and `release` (codename, e.g. debian/bookworm).
    kind="template": `path` of the parent template (absolute when loaded from a file).
    kind="image": `image` as written after `image:` — NAME, NAME:VERSION or a UUID.
    """

    kind: Literal["distro", "template", "image"]
    distro: str = ""
    release: str = ""
    path: str = ""
    image: str = ""

    @property
    def image_name(self) -> str:
        return self.image.split(":", 1)[0]

    @property
    def image_version(self) -> str:
        _, _, version = self.image.partition(":")
        return version

    def __str__(self) -> str:
        if self.kind == "distro":
            return f"{self.distro}/{self.release}"
        if self.kind == "template":
            return f"template:{self.path}"
        return f"image:{self.image}"


@dataclass(frozen=True)
class Template:
    name: str
    base: BaseRef
    arch: str = DEFAULT_ARCH
    packages: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()
    services_enable: tuple[str, ...] = ()
    services_disable: tuple[str, ...] = ()
    run: tuple[str, ...] = ()
    size: int = DEFAULT_SIZE
    description: str = ""
    version: str = ""
    text: str = ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Parser:
    """Walks the composed node tree so every error can name its line."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.loader = yaml.SafeLoader(text)

    def fail(self, node: Node | None, message: str) -> InvalidRequest:
        if node is None:
            return InvalidRequest(f"{self.source}: {message}")
        return InvalidRequest(f"{self.source} line {node.start_mark.line + 1}: {message}")

    def value(self, node: Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self.fail(node, f"invalid YAML: {_one_line(str(exc))}") from None

    def string(self, node: Node, what: str) -> str:
        value = self.value(node)
        if not isinstance(node, ScalarNode) or not isinstance(value, str):
            raise self.fail(node, f"{what} must be a string")
        return value

    def strings(self, node: Node, what: str) -> list[tuple[Node, str]]:
        if not isinstance(node, SequenceNode):
            raise self.fail(node, f"'{what}' must be a list of strings")
        return [(item, self.string(item, f"each item of '{what}'")) for item in node.value]

    def mapping(self, node: Node, what: str, allowed: tuple[str, ...] | None) -> dict[str, Node]:
        """Keys (validated against `allowed` when given) → value nodes."""
        if not isinstance(node, MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        seen: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if not isinstance(key_node, ScalarNode) or not isinstance(key, str):
                raise self.fail(key_node, f"keys of {what} must be strings, not {key!r}")
            if allowed is not None and key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                where = "" if what == "the template" else f" in {what}"
                raise self.fail(key_node, f"unknown key '{key}'{where}{hint}")
            if key in seen:
                raise self.fail(key_node, f"duplicate key '{key}' in {what}")
            seen[key] = value_node
        return seen

    def parse(self, text: str, base_dir: Path | None) -> Template:
        try:
            root = self.loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f" line {mark.line + 1}" if mark is not None else ""
            problem = _one_line(exc.problem or exc.context or "syntax error")
            raise InvalidRequest(f"{self.source}{line}: invalid YAML: {problem}") from None
        except yaml.YAMLError as exc:
            raise InvalidRequest(f"{self.source}: invalid YAML: {_one_line(str(exc))}") from None
        finally:
            self.loader.dispose()
        if root is None:
            raise self.fail(None, "the template is empty (a mapping is required)")
        if not isinstance(root, MappingNode):
            raise self.fail(root, "the template must be a mapping of keys to values")
        keys = self.mapping(root, "the template", TEMPLATE_KEYS)
        for required in ("name", "from"):
            if required not in keys:
                raise self.fail(None, f"missing required key '{required}'")

        name = self.string(keys["name"], "'name'")
        try:
            check_name(name)  # the image's name: the repository's rule, checked up front
        except InvalidRequest as exc:
            raise self.fail(keys["name"], exc.message) from None
        base = self.base(keys["from"], base_dir)
        arch = DEFAULT_ARCH
        if "arch" in keys:
            arch = self.string(keys["arch"], "'arch'")
            if arch not in ARCHES:
                raise self.fail(
                    keys["arch"], f"unsupported arch '{arch}' (supported: {', '.join(ARCHES)})"
                )
        enable, disable = self.services(keys.get("services"))
        return Template(
            name=name,
            base=base,
            arch=arch,
            packages=self.packages(keys.get("packages")),
            files=self.files(keys.get("files")),
            services_enable=enable,
            services_disable=disable,
            run=self.run(keys.get("run")),
            size=self.size(keys["size"]) if "size" in keys else DEFAULT_SIZE,
            description=self.string(keys["description"], "'description'")
            if "description" in keys
            else "",
            version=self.version(keys["version"]) if "version" in keys else "",
            text=text,
        )

    def version(self, node: Node) -> str:
        # The text as written: YAML would read `version: 1.10` as the float 1.1.
        if not isinstance(node, ScalarNode) or isinstance(self.value(node), bool):
            raise self.fail(node, "'version' must be a string or number")
        try:
            return check_version(str(node.value))
        except InvalidRequest as exc:
            raise self.fail(node, exc.message) from None

    def base(self, node: Node, base_dir: Path | None) -> BaseRef:
        ref = self.string(node, "'from'").strip()
        kind, sep, rest = ref.partition(":")
        if sep and kind == "template":
            if not rest:
                raise self.fail(node, "'from: template:' needs a path")
            path = Path(rest)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            return BaseRef(kind="template", path=str(path))
        if sep and kind == "image":
            name, _, version = rest.partition(":")
            ok = bool(_UUID_RE.match(rest)) or (
                bool(_NAME_RE.match(name))
                and (not version or bool(_IMAGE_VERSION_RE.match(version)))
            )
            if not ok:
                raise self.fail(node, f"invalid image reference '{rest}' (image:NAME[:VERSION])")
            return BaseRef(kind="image", image=rest)
        distro, slash, release = ref.partition("/")
        if not slash or not distro or not release or "/" in release:
            raise self.fail(
                node,
                f"invalid 'from' '{ref}' (DISTRO/RELEASE, template:PATH or image:NAME[:VERSION])",
            )
        distro, release = distro.lower(), release.lower()
        if distro not in DISTRO_RELEASES:
            supported = ", ".join(sorted(DISTRO_RELEASES))
            raise self.fail(node, f"unsupported distribution '{distro}' (supported: {supported})")
        release = DISTRO_RELEASES[distro].get(release, release)
        if release not in DISTRO_CODENAMES[distro]:
            known = ", ".join(sorted(DISTRO_CODENAMES[distro]))
            raise self.fail(node, f"unknown {distro} release '{release}' (known: {known})")
        return BaseRef(kind="distro", distro=distro, release=release)

    def packages(self, node: Node | None) -> tuple[str, ...]:
        if node is None:
            return ()
        versions: dict[str, str] = {}
        for item, spec in self.strings(node, "packages"):
            name, eq, version = spec.strip().partition("=")
            if not _PACKAGE_RE.match(name) or (eq and not _PACKAGE_VERSION_RE.match(version)):
                raise self.fail(item, f"invalid package name '{spec}'")
            # A bare name and a pinned one merge into the pin; two pins must agree.
            known = versions.get(name, "")
            if known and version and known != version:
                raise self.fail(item, f"package '{name}' is listed with different versions")
            versions[name] = version or known
        return tuple(sorted(f"{n}={v}" if v else n for n, v in versions.items()))

    def files(self, node: Node | None) -> tuple[tuple[str, str], ...]:
        if node is None:
            return ()
        if not isinstance(node, MappingNode):
            raise self.fail(node, "'files' must be a mapping of absolute paths to contents")
        files: dict[str, str] = {}
        for key_node, value_node in node.value:
            raw = self.string(key_node, "each path in 'files'")
            path = self.file_path(key_node, raw)
            if path in files:
                raise self.fail(key_node, f"file '{path}' is listed twice")
            files[path] = self.string(value_node, f"the content of '{raw}'")
        return tuple(sorted(files.items()))

    def file_path(self, node: Node, raw: str) -> str:
        if not raw.startswith("/"):
            raise self.fail(node, f"file path '{raw}' must be absolute")
        if "\0" in raw or raw.endswith("/"):
            raise self.fail(node, f"file path '{raw}' must name a file")
        parts = [part for part in raw.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise self.fail(node, f"file path '{raw}' must not contain '..'")
        if not parts:
            raise self.fail(node, f"file path '{raw}' must name a file")
        if parts[0] in _FORBIDDEN_ROOTS:
            raise self.fail(node, f"file path '{raw}' is under /{parts[0]}, which is not on disk")
        return "/" + "/".join(parts)

    def services(self, node: Node | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if node is None:
            return (), ()
        keys = self.mapping(node, "'services'", SERVICE_KEYS)
        found: dict[str, set[str]] = {}
        for key in SERVICE_KEYS:
            units: set[str] = set()
            if key in keys:
                for item, unit in self.strings(keys[key], f"services.{key}"):
                    if not _SERVICE_RE.match(unit):
                        raise self.fail(item, f"invalid service name '{unit}'")
                    units.add(unit)
            found[key] = units
        both = found["enable"] & found["disable"]
        if both:
            raise self.fail(node, f"service '{min(both)}' is both enabled and disabled")
        return tuple(sorted(found["enable"])), tuple(sorted(found["disable"]))

    def run(self, node: Node | None) -> tuple[str, ...]:
        if node is None:
            return ()
        commands = []
        for item, command in self.strings(node, "run"):
            if not command.strip():
                raise self.fail(item, "commands in 'run' must not be empty")
            commands.append(command)
        return tuple(commands)

    def size(self, node: Node) -> int:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(node, ScalarNode):
            raise self.fail(node, "'size' must be a size such as 4G, 512M or 10GiB")
        try:
            size = value if isinstance(value, int) else parse_size(str(value))
        except InvalidRequest:
            raise self.fail(node, f"cannot parse size '{value}' (e.g. 4G, 512M, 10GiB)"
                            ) from None
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise self.fail(node, f"size {size} bytes is out of range (1 GiB to 2 TiB)")
        return size


def parse_template(
    text: str, *, source: str = "<template>", base_dir: Path | None = None
) -> Template:
    """Parse and validate a template; `base_dir` resolves `from: template:PATH`."""
    return _Parser(text, source).parse(text, base_dir)


def load_template(path: Path) -> Template:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidRequest(f"cannot read template {path}: {reason}") from None
    return parse_template(text, source=path.name, base_dir=path.parent.resolve())


def canonical(template: Template, resolved_parent: str) -> dict[str, Any]:
    """Everything that determines the image's content, in a normalised form.

    Name, description, version and text are left out: renaming a template does
    not make a different image. For template and image bases only the kind is
    kept; `resolved_parent` (the parent template's digest, or the parent
    image's id/sha256) says what the content really starts from, so moving a
    parent file or retagging an image does not change the digest by itself.
    """
    base: dict[str, str] = {"kind": template.base.kind}
    if template.base.kind == "distro":
        base.update(distro=template.base.distro, release=template.base.release)
    return {
        "schema": CANONICAL_SCHEMA,
        "base": base,
        "parent": resolved_parent,
        "arch": template.arch,
        "packages": sorted(set(template.packages)),
        "files": dict(sorted(template.files)),
        "services": {
            "enable": sorted(set(template.services_enable)),
            "disable": sorted(set(template.services_disable)),
        },
        "run": list(template.run),
        "size": template.size,
    }


def template_digest(template: Template, resolved_parent: str) -> str:
    """SHA-256 hex of the canonical JSON: equal digests mean the same image."""
    data = json.dumps(
        canonical(template, resolved_parent),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(data.encode("utf-8")).hexdigest()

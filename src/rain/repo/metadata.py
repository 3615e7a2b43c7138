"""What users may write into an image's metadata: the rules, checked on create and update.

Names, versions, tags and property keys end up in references, URLs, file
names (`rain pull` names its output after the image), tables and other
clouds' catalogs, so they are kept to a small alphabet; every value has a
length cap and no control characters. The `rain.` prefix of property keys
and tags belongs to the server (e.g. `rain.previous_sha256`, the provenance
of a rebuilt image): users can neither set nor remove such keys, the
server's own code paths (the builder) can. Each refusal is a 400 naming the
rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from rain.catalog import is_id_prefix
from rain.model import InvalidRequest

RESERVED_PREFIX = "rain."
MAX_NAME = 128
MAX_VERSION = 64
MAX_LABEL = 128  # tags, property keys, package names and versions
MAX_OS_FIELD = 64
MAX_PROPERTY_VALUE = 1024
MAX_DESCRIPTION = 8192
MAX_TAGS = 100
MAX_PROPERTIES = 128
MAX_PACKAGES = 100_000

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]*")
_OS_FIELD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _string(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string, not {_shown(value)}")
    return value


def check_name(value: Any) -> str:
    name = _string("name", value)
    if not (0 < len(name) <= MAX_NAME) or not _NAME.fullmatch(name):
        raise InvalidRequest(f"bad image name {_shown(name)}: use 1-{MAX_NAME} letters, digits, "
                             "'.', '_', '-', starting with a letter or digit")
    if is_id_prefix(name):
        raise InvalidRequest(f"bad image name {_shown(name)}: it reads as an id prefix (only "
                             "hex digits and '-'); add a letter from g to z")
    return name


def check_version(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # `"version": 2` from a script
    version = _string("version", value)
    if version and (len(version) > MAX_VERSION or not _VERSION.fullmatch(version)):
        raise InvalidRequest(f"bad version {_shown(version)}: use up to {MAX_VERSION} letters, "
                             "digits, '.', '_', '+', '~', '-', starting with a letter or digit")
    return version


def check_os_field(key: str, value: Any) -> str:
    """os_distro, os_release, arch: empty, or a short word."""
    text = _string(key, value)
    if text and (len(text) > MAX_OS_FIELD or not _OS_FIELD.fullmatch(text)):
        raise InvalidRequest(f"bad {key} {_shown(text)}: use up to {MAX_OS_FIELD} letters, "
                             "digits, '.', '_', '+', '~', '-', starting with a letter or digit")
    return text


def check_description(value: Any) -> str:
    text = _string("description", value)
    if len(text) > MAX_DESCRIPTION or _CONTROL_BUT_LINES.search(text):
        raise InvalidRequest(f"bad description: at most {MAX_DESCRIPTION} characters, and no "
                             "control characters but newlines and tabs")
    return text


def _label(what: str, value: Any, *, internal: bool) -> str:
    label = _string(what, value)
    if not (0 < len(label) <= MAX_LABEL) or not _LABEL.fullmatch(label):
        raise InvalidRequest(f"bad {what} {_shown(label)}: use 1-{MAX_LABEL} letters, digits, "
                             "'.', '_', ':', '+', '-', starting with a letter or digit")
    if not internal and label.lower().startswith(RESERVED_PREFIX):
        raise InvalidRequest(f"bad {what} {_shown(label)}: the '{RESERVED_PREFIX}' prefix is "
                             "reserved for the server")
    return label


def check_tags(values: Any, *, internal: bool = False) -> list[str]:
    if not isinstance(values, list | tuple):
        raise InvalidRequest("tags must be a list of strings")
    tags = [_label("tag", t, internal=internal) for t in values]
    if len(set(tags)) > MAX_TAGS:
        raise InvalidRequest(f"an image may have at most {MAX_TAGS} tags")
    return tags


def check_property_keys(values: Any, *, internal: bool = False) -> list[str]:
    if not isinstance(values, list | tuple):
        raise InvalidRequest("remove_properties must be a list of keys")
    return [_label("property key", k, internal=internal) for k in values]


def check_properties(values: Any, *, internal: bool = False) -> dict[str, str]:
    if not isinstance(values, dict):
        raise InvalidRequest("properties must be an object of KEY: VALUE strings")
    out = {}
    for key, value in values.items():
        key = _label("property key", key, internal=internal)
        text = _string(f"property {key!r}", value)
        if len(text) > MAX_PROPERTY_VALUE or _CONTROL.search(text):
            raise InvalidRequest(f"bad value for property {key!r}: at most "
                                 f"{MAX_PROPERTY_VALUE} characters, no control characters "
                                 "(NUL, newlines, tabs)")
        out[key] = text
    if len(out) > MAX_PROPERTIES:
        raise InvalidRequest(f"an image may have at most {MAX_PROPERTIES} properties")
    return out


def check_packages(values: Any) -> dict[str, str]:
    """Package name → version (what the image carries; builders fill it in)."""
    if not isinstance(values, dict) or len(values) > MAX_PACKAGES:
        raise InvalidRequest(f"packages must be an object of at most {MAX_PACKAGES} "
                             "NAME: VERSION strings")
    out = {}
    for name, version in values.items():
        name, version = _string("package name", name), _string(f"package {name!r}", version)
        if not (0 < len(name) <= MAX_LABEL) or len(version) > MAX_LABEL or \
                _CONTROL.search(name + version) or any(c.isspace() for c in name):
            raise InvalidRequest(f"bad package {_shown(name)}={_shown(version)}: names of 1-"
                                 f"{MAX_LABEL} characters, versions of up to {MAX_LABEL}, "
                                 "no spaces or control characters")
        out[name] = version
    return out


def total_after(have: Iterable[str], add: Iterable[str], remove: Iterable[str],
                limit: int, what: str) -> None:
    """Refuse an update that would leave an image with more than `limit` tags/properties."""
    left = (set(have) - set(remove)) | set(add)
    if len(left) > limit:
        raise InvalidRequest(f"an image may have at most {limit} {what}")

"""Templates: parsing, validation with line numbers, canonical digests."""

from __future__ import annotations

from pathlib import Path

import pytest

from rain.build.template import (
    GIB,
    BaseRef,
    Template,
    canonical,
    load_template,
    parse_template,
    template_digest,
)
from rain.model.errors import InvalidRequest

EXAMPLE = """\
name: hpc-node
from: debian/bookworm        # a distro/release, another template, or an image
arch: amd64
packages: [openmpi-bin, python3-numpy, nginx]
files: {/etc/motd: "Welcome to the cluster\\n"}
services: {enable: [nginx]}
run: ["echo built > /etc/built-by-rain"]
size: 4G
"""

PARENT = "p" * 64


def digest(text: str, parent: str = PARENT) -> str:
    return template_digest(parse_template(text), parent)


def test_issue_example_parses() -> None:
    t = parse_template(EXAMPLE, source="hpc.yaml")
    assert t == Template(
        name="hpc-node",
        base=BaseRef(kind="distro", distro="debian", release="bookworm"),
        arch="amd64",
        packages=("nginx", "openmpi-bin", "python3-numpy"),
        files=(("/etc/motd", "Welcome to the cluster\n"),),
        services_enable=("nginx",),
        services_disable=(),
        run=("echo built > /etc/built-by-rain",),
        size=4 * GIB,
        text=EXAMPLE,
    )
    assert len(template_digest(t, PARENT)) == 64


def test_defaults_and_version_kept_as_written() -> None:
    t = parse_template("name: x\nfrom: debian/12\nversion: 1.10\ndescription: d\n")
    assert (t.arch, t.size, t.packages, t.run) == ("amd64", 4 * GIB, (), ())
    assert (t.version, t.description) == ("1.10", "d")


def test_digest_ignores_order_duplicates_and_naming() -> None:
    reordered = """\
size: 4096M
run: ["echo built > /etc/built-by-rain"]
services: {enable: [nginx, nginx]}
packages: [nginx, python3-numpy, openmpi-bin, nginx]
files: {/etc//motd: "Welcome to the cluster\\n"}
arch: amd64
from: debian/bookworm
name: another-name
description: renamed and reordered
version: "2"
"""
    assert digest(reordered) == digest(EXAMPLE)


def test_digest_ignores_file_map_order() -> None:
    a = "name: a\nfrom: debian/12\nfiles: {/etc/a: '1', /etc/b: '2'}\n"
    b = "name: a\nfrom: debian/12\nfiles: {/etc/b: '2', /etc/a: '1'}\n"
    assert digest(a) == digest(b)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("[openmpi-bin, python3-numpy, nginx]", "[openmpi-bin, python3-numpy, nginx, vim]"),
        ("arch: amd64", "arch: arm64"),
        ("size: 4G", "size: 5G"),
        ('/etc/motd: "Welcome', '/etc/motd: "Hello'),
        ("enable: [nginx]", "disable: [nginx]"),
        ("debian/bookworm", "debian/trixie"),
    ],
)
def test_digest_changes_with_content(old: str, new: str) -> None:
    assert old in EXAMPLE
    assert digest(EXAMPLE.replace(old, new)) != digest(EXAMPLE)


def test_digest_depends_on_run_order() -> None:
    a = "name: a\nfrom: debian/12\nrun: [one, two]\n"
    b = "name: a\nfrom: debian/12\nrun: [two, one]\n"
    assert parse_template(a).run == ("one", "two")
    assert digest(a) != digest(b)


def test_digest_depends_on_resolved_parent() -> None:
    assert digest(EXAMPLE, "a" * 64) != digest(EXAMPLE, "b" * 64)


def test_numeric_release_is_normalised() -> None:
    t = parse_template(EXAMPLE.replace("debian/bookworm", "debian/12"))
    assert t.base == BaseRef(kind="distro", distro="debian", release="bookworm")
    assert template_digest(t, PARENT) == digest(EXAMPLE)


def test_canonical_leaves_out_names_and_text() -> None:
    c = canonical(parse_template(EXAMPLE), PARENT)
    assert set(c) == {
        "schema",
        "base",
        "parent",
        "arch",
        "packages",
        "files",
        "services",
        "run",
        "size",
    }
    assert c["base"] == {"kind": "distro", "distro": "debian", "release": "bookworm"}


def test_from_template_and_image() -> None:
    t = parse_template("name: a\nfrom: template:base.yaml\n")
    assert t.base == BaseRef(kind="template", path="base.yaml")
    i = parse_template("name: a\nfrom: image:debian:12\n").base
    assert i == BaseRef(kind="image", image="debian:12")
    assert (i.image_name, i.image_version) == ("debian", "12")
    uuid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert parse_template(f"name: a\nfrom: image:{uuid}\n").base.image == uuid


def test_load_template_resolves_parent_relative_to_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "child.yaml"
    path.write_text("name: child\nfrom: template:../base.yaml\n")
    t = load_template(path)
    assert t.base.kind == "template"
    assert Path(t.base.path).resolve() == (tmp_path / "base.yaml").resolve()
    with pytest.raises(InvalidRequest, match="cannot read template"):
        load_template(tmp_path / "missing.yaml")


def test_load_template_names_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "hpc.yaml"
    path.write_text(EXAMPLE.replace("packages:", "pakages:"))
    with pytest.raises(InvalidRequest) as info:
        load_template(path)
    assert str(info.value) == "hpc.yaml line 4: unknown key 'pakages' (did you mean 'packages'?)"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("packages:", "pakages:", "line 4: unknown key 'pakages' (did you mean 'packages'?)"),
        ("nginx]\nfiles", "Nginx!]\nfiles", "line 4: invalid package name 'Nginx!'"),
        ("/etc/motd:", "etc/motd:", "line 5: file path 'etc/motd' must be absolute"),
        ("/etc/motd:", "/etc/../motd:", "line 5: file path '/etc/../motd' must not contain '..'"),
        ("/etc/motd:", "/proc/x:", "line 5: file path '/proc/x' is under /proc"),
        ("size: 4G", "size: 512M", "line 8: size 536870912 bytes is out of range"),
        ("size: 4G", "size: 3T", "line 8: size 3298534883328 bytes is out of range"),
        ("size: 4G", "size: four", "line 8: cannot parse size 'four'"),
        (
            "debian/bookworm",
            "fedora/40",
            "line 2: unsupported distribution 'fedora' (supported: debian)",
        ),
        ("debian/bookworm", "debian/9", "line 2: unknown debian release '9'"),
        ("debian/bookworm", "debian", "line 2: invalid 'from' 'debian'"),
        ("{enable: [nginx]}", "{enabel: [nginx]}", "line 6: unknown key 'enabel' in 'services'"),
        ("{enable: [nginx]}", "{enable: nginx}", "line 6: 'services.enable' must be a list"),
        ("arch: amd64", "arch: sparc", "line 3: unsupported arch 'sparc'"),
        ("run: [", "run: [42, ", "line 7: each item of 'run' must be a string"),
        ("size: 4G", "size: [4G]", "line 8: 'size' must be a size"),
        ("arch: amd64", "name: again", "line 3: duplicate key 'name'"),
        ("files: {", "files: {/etc/motd: x, ", "line 5: file '/etc/motd' is listed twice"),
        ("from: debian/bookworm", "from: 'image:'", "line 2: invalid image reference"),
    ],
)
def test_bad_templates_name_problem_and_line(old: str, new: str, expected: str) -> None:
    assert old in EXAMPLE
    with pytest.raises(InvalidRequest) as info:
        parse_template(EXAMPLE.replace(old, new, 1), source="hpc.yaml")
    message = str(info.value)
    assert message.startswith(f"hpc.yaml {expected}"), message
    assert "\n" not in message


def test_unknown_key_with_suggestion() -> None:
    with pytest.raises(InvalidRequest, match=r"line 3: unknown key 'pakages' \(did you mean"):
        parse_template("name: a\nfrom: debian/12\npakages: [vim]\n")
    with pytest.raises(InvalidRequest) as info:
        parse_template("name: a\nfrom: debian/12\nzzz: 1\n")
    assert str(info.value) == "<template> line 3: unknown key 'zzz'"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: a\n", "<template>: missing required key 'from'"),
        ("from: debian/12\n", "<template>: missing required key 'name'"),
        ("name: a\nfrom: [debian\n", "<template> line 3: invalid YAML:"),
        ("name: a\n  from: b: c\n", "<template> line 2: invalid YAML:"),
        ("- name: a\n", "<template> line 1: the template must be a mapping"),
        ("just text\n", "<template> line 1: the template must be a mapping"),
        ("", "<template>: the template is empty"),
        ("name: a\nfrom: debian/12\nfiles: [/etc/motd]\n", "<template> line 3: 'files' must be"),
    ],
)
def test_structural_errors(text: str, expected: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_template(text)
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


def test_packages_versions_and_conflicts() -> None:
    t = parse_template("name: a\nfrom: debian/12\npackages: [vim=2:9.0.1378-2, curl, vim]\n")
    assert t.packages == ("curl", "vim=2:9.0.1378-2")
    with pytest.raises(InvalidRequest, match="line 3: package 'vim' is listed with different"):
        parse_template("name: a\nfrom: debian/12\npackages: [vim=1.0, vim=2.0]\n")


def test_service_both_enabled_and_disabled() -> None:
    with pytest.raises(InvalidRequest, match="service 'ssh' is both enabled and disabled"):
        parse_template("name: a\nfrom: debian/12\nservices: {enable: [ssh], disable: [ssh]}\n")


def test_size_bounds_are_inclusive() -> None:
    assert parse_template("name: a\nfrom: debian/12\nsize: 1G\n").size == GIB
    assert parse_template("name: a\nfrom: debian/12\nsize: 2TiB\n").size == 2 * 1024**4
    assert parse_template("name: a\nfrom: debian/12\nsize: 1073741824\n").size == GIB

"""What a build is asked to make: a template and the templates it extends.

A template that says `from: template:PATH` names a file on the user's
machine, which the server cannot read. So the client sends the texts along:
the template, then its parent template, then that one's parent … (nearest
first), as far as the chain goes until it reaches a distribution
(`debian/bookworm`) or an image (`image:NAME[:VERSION]`). The server checks
that the chain is complete and stores the texts with the build and the image,
so a purged image can be rebuilt without the files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rain.build.template import BaseRef, Template, parse_template, template_digest
from rain.model.errors import InvalidRequest
from rain.model.units import plural


@dataclass(frozen=True)
class BuildRequest:
    template: Template
    # The templates it extends through `from: template:...`, nearest first.
    parents: tuple[Template, ...] = ()
    # The template digest with the parent resolved; filled in by the build queue.
    digest: str = ""

    @property
    def root(self) -> Template:
        """The last template of the chain: its `from` is a distribution or an image."""
        return self.parents[-1] if self.parents else self.template

    @property
    def parent_texts(self) -> list[str]:
        return [p.text for p in self.parents]


def parse_request(text: str, parents: Sequence[str] = (),
                  sources: Sequence[str] = ()) -> BuildRequest:
    """Parse and validate a template and its parent templates (400 on any problem).

    `sources` names the template and each parent (file names) in error messages.
    """
    names = list(sources)
    template = parse_template(text, source=names[0] if names else "template")
    chain: list[Template] = []
    current = template
    for number, parent_text in enumerate(parents, 1):
        if current.base.kind != "template":
            raise InvalidRequest(
                f"{plural(len(parents), 'parent template')} "
                f"{'was' if len(parents) == 1 else 'were'} sent, but template '{current.name}' "
                f"starts from {current.base}, not from a template")
        source = (names[number] if number < len(names)
                  else f"parent template {number} ({current.base.path})")
        current = parse_template(parent_text, source=source)
        chain.append(current)
    if current.base.kind == "template":
        raise InvalidRequest(
            f"template '{current.name}' extends {current.base}, whose text was not sent: pass "
            "the parent templates' texts too (`parents`; the rain CLI does this)")
    return BuildRequest(template, tuple(chain))


def resolve_digest(request: BuildRequest, resolve_image: Callable[[BaseRef], str]) -> str:
    """The template digest, resolving parents from the root of the chain down.

    A distribution base resolves to "" (the base's distro and release are part
    of the canonical form already); an image base to what `resolve_image`
    says (its id, which survives purge and rebuild); a template base to that
    template's own digest.
    """
    root = request.root
    resolved = resolve_image(root.base) if root.base.kind == "image" else ""
    return chain_digests(request, resolved)[-1]


def chain_digests(request: BuildRequest, resolved_root_parent: str) -> list[str]:
    """The digest of every template of the chain, root first (the request's is last)."""
    digests: list[str] = []
    parent = resolved_root_parent
    for template in (*reversed(request.parents), request.template):
        parent = template_digest(template, parent)
        digests.append(parent)
    return digests

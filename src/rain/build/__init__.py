"""Build images from templates: templates and their digests (builders come later)."""

from rain.build.template import (
    TEMPLATE_KEYS,
    BaseRef,
    Template,
    canonical,
    load_template,
    parse_size,
    parse_template,
    template_digest,
)

__all__ = [
    "TEMPLATE_KEYS",
    "BaseRef",
    "Template",
    "canonical",
    "load_template",
    "parse_size",
    "parse_template",
    "template_digest",
]

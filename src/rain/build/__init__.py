"""Build images from templates: templates and their digests, build requests, the job queue
(`rain.build.jobs`) and, behind `BuildRunner`, the builders."""

from rain.build.template import (
    TEMPLATE_KEYS,
    BaseRef,
    Template,
    canonical,
    load_template,
    parse_template,
    template_digest,
)

__all__ = [
    "TEMPLATE_KEYS",
    "BaseRef",
    "Template",
    "canonical",
    "load_template",
    "parse_template",
    "template_digest",
]

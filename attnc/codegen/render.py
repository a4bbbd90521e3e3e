"""Rendering: one jinja2 environment, one template per kernel family, source text out."""

from __future__ import annotations

import functools
from importlib import resources

import jinja2

from attnc.codegen.context import KernelContext
from attnc.errors import BuildError

TEMPLATE_DIR = resources.files("attnc.codegen") / "templates"


@functools.cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )


def template_name(family: str) -> str:
    return f"{family}.py.j2"


def render(ctx: KernelContext) -> str:
    """The TileLang source of ``ctx.family``'s template for this context."""
    try:
        template = environment().get_template(template_name(ctx.family))
    except jinja2.TemplateNotFound as error:
        raise BuildError(f"no template for kernel family {ctx.family!r}") from error
    try:
        return template.render(ctx=ctx)
    except jinja2.UndefinedError as error:
        raise BuildError(f"template {template_name(ctx.family)} uses a value the context lacks: {error}") from error

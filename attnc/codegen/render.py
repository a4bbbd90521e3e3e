"""Rendering: one jinja2 environment per template directory, one template per kernel family, source text out."""

from __future__ import annotations

import functools
import os
from importlib import resources

import jinja2

from attnc.codegen.context import KernelContext
from attnc.errors import BuildError

TEMPLATE_DIR = resources.files("attnc.codegen") / "templates"

TEMPLATE_DIR_ENV = "ATTNC_TEMPLATE_DIR"
"""Environment variable naming a directory of templates to render from instead of the package's: a variant of a
template, to compare with the package's (`benchmarks/bwd_variants.py`). Cache keys derive from the rendered source,
so a variant's kernels never collide with the package's."""


def template_dir() -> str:
    """Where templates are read from: `TEMPLATE_DIR_ENV` when set, else the package's."""
    return os.environ.get(TEMPLATE_DIR_ENV) or str(TEMPLATE_DIR)


@functools.cache
def environment(directory: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
    )


def template_name(family: str) -> str:
    return f"{family}.py.j2"


def render(ctx: KernelContext) -> str:
    """The TileLang source of ``ctx.family``'s template for this context."""
    directory = template_dir()
    try:
        template = environment(directory).get_template(template_name(ctx.family))
    except jinja2.TemplateNotFound as error:
        raise BuildError(f"no template for kernel family {ctx.family!r} in {directory}") from error
    try:
        return template.render(ctx=ctx)
    except jinja2.UndefinedError as error:
        raise BuildError(f"template {template_name(ctx.family)} uses a value the context lacks: {error}") from error

"""Code generation: the expression printer, jinja2 templates per kernel family, rendering and building."""

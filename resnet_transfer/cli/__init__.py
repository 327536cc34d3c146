"""The `rt` command line (typer): one module per command group, assembled in ``app.py``."""

from .app import app, main

__all__ = ["app", "main"]

"""The ``moemesh`` command line: one module per command, wired together by :mod:`moemesh.cli.main`.

Like ``launch/``, this package sits above the roles: it is the only place (with ``launch/``) that
imports them. ``python -m moemesh.cli`` and the ``moemesh`` console script both run :func:`main`.
"""

from moemesh.cli.main import build_parser, main

__all__ = ["build_parser", "main"]

"""The ``moemesh`` command line: one module per command, wired together by :mod:`moemesh.cli.main`.

Like ``launch/``, this package sits above the roles: it is the only place (with ``launch/``) that
imports them. ``python -m moemesh.cli`` and the ``moemesh`` console script both run :func:`main`.
"""

from moemesh.cli.huge_pages import ask_for_huge_pages

ask_for_huge_pages()  # before the first import of torch below: PyTorch reads the switch once

from moemesh.cli.main import build_parser, main  # noqa: E402 (after the switch, on purpose)

__all__ = ["build_parser", "main"]

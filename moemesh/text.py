"""``shorten``: request-provided strings cut before they are echoed in an error message or a log line.

A caller controls the ids and names it sends; echoed whole, a 10 KB request id makes a 10 KB error (and log
line) per call. Every error that names something from a request passes it through :func:`shorten`.
"""

from __future__ import annotations

MAX_ECHO_CHARS = 64  # enough to recognise an id or a name; an error names several at most
MAX_DETAILS_CHARS = 2048  # a whole status message, whatever it quotes (moemesh.wire.status)


def shorten(text: str, n: int = MAX_ECHO_CHARS) -> str:
    """``text`` if it has at most ``n`` characters; else its first ones, then how many more there were.

    The result has at most ``n`` characters plus the marker, e.g. ``shorten("a" * 10_000, 8)`` is
    ``'aaaaaaaa...(+9992 chars)'``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(text) <= n:
        return text
    return f"{text[:n]}...(+{len(text) - n} chars)"

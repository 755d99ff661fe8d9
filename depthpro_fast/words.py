"""The wording of messages: small helpers that every command's text uses the same way."""

from __future__ import annotations


def plural(n: int, word: str) -> str:
    """``"1 image"``, ``"3 images"``: the count and the word, with an ``s`` unless one."""
    return f"{n} {word}{'' if n == 1 else 's'}"

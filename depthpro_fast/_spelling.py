"""Option names in error messages, spelled the way the user wrote them.

The same check (a bad SHA-256, a missing checkpoint, an unknown config) is reached from Python
(``load(config=...)``) and from the command line (``--config``). A message that tells a command-line
user to "pass config=" names something they cannot type, so messages name options through
:func:`option`, and ``depthpro-fast`` runs every command inside :func:`cli_spelling`.

A ``ContextVar`` rather than a global: a Python program that imports the package (or a test) while
a command runs elsewhere keeps its own spelling. Worker threads start with the default (Python)
spelling; the checks that name options run in the command's own thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_CLI: ContextVar[bool] = ContextVar("depthpro_fast_cli_spelling", default=False)


def in_cli() -> bool:
    """Whether messages are being written for a ``depthpro-fast`` command."""
    return _CLI.get()


def option(python: str, cli: str) -> str:
    """``python`` (e.g. ``"config="``) in the API, ``cli`` (e.g. ``"--config"``) in a command."""
    return cli if _CLI.get() else python


@contextlib.contextmanager
def cli_spelling() -> Iterator[None]:
    """Within the block, :func:`option` gives the command-line spelling."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)

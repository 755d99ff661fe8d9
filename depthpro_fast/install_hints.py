"""How to install what an optional feature needs, worded once for every message that says it.

The package is installed from a checkout (``./install.sh``), not from a package index, so a
hint names the checkout's commands: ``install.sh``'s argument or pip's editable install with the
extra (``pyproject.toml``, ``[project.optional-dependencies]``).
"""

from __future__ import annotations


def extra_hint(extra: str) -> str:
    """The two commands that install ``extra`` from a checkout of this repository."""
    return f"./install.sh {extra}, or from a checkout: pip install -e '.[{extra}]'"


EXPORT_HINT = extra_hint("export")
VIDEO_HINT = extra_hint("video")
OPENVINO_HINT = extra_hint("openvino")

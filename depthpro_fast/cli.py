"""The ``depthpro-fast`` command.

Each subcommand lives in its own module ``depthpro_fast/commands/<name>.py`` with two functions:
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code). Modules are imported only
when their subcommand runs, so ``depthpro-fast info`` stays quick.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import sys
import warnings
from collections.abc import Iterator

# name -> one-line help; the module is depthpro_fast.commands.<name>
COMMANDS = {
    "bench": "latency benchmark: reference vs fast paths side by side (random weights)",
    "predict": "depth maps for images, folders and globs (npz, 16-bit PNG, colour preview, PLY)",
    "export": "the network as ONNX (opset >= 18, for ONNX Runtime / TensorRT) or torch.export .pt2",
    "download": "fetch Apple's depth_pro.pt into the user cache (resumable, checksummed)",
    "demo": "run the reference model with random weights on a generated image, write a depth map",
    "info": "versions, devices, available backends (and why not), checkpoint search paths",
}


def _available_commands() -> dict[str, str]:
    found = {}
    for name, help_text in COMMANDS.items():
        if importlib.util.find_spec(f"depthpro_fast.commands.{name}") is not None:
            found[name] = help_text
    return found


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="depthpro-fast",
        description="Fast, faithful DepthPro: metric depth and focal length from one image.")
    parser.add_argument("--version", action="version", version=f"depthpro_fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in _available_commands().items():
        module = importlib.import_module(f"depthpro_fast.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
    return parser


@contextlib.contextmanager
def _plain_warnings(command: str) -> Iterator[None]:
    """Show warnings as one line naming the command, not as ``file:line: Category: text`` with
    a source line from deep inside the package (which reads like a crash)."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"depthpro-fast {command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def check_config_early(args: argparse.Namespace) -> None:
    """A ``--config`` that names no preset and no file is refused before the command says
    anything else (notes about random weights, progress), not after it."""
    config = getattr(args, "config", None)
    if isinstance(config, str):
        from .config import resolve_config

        resolve_config(config)


def main(argv: list[str] | None = None) -> int:
    from ._spelling import cli_spelling

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"depthpro_fast.commands.{args.command}")
    # errors and warnings name command-line options (--config), not Python ones (config=)
    with cli_spelling(), _plain_warnings(args.command):
        try:
            check_config_early(args)
            return int(module.run(args) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except (ValueError, TypeError, OSError, RuntimeError, MemoryError) as e:
            # OSError covers FileNotFoundError and PermissionError: a message, not a traceback
            print(f"depthpro-fast {args.command}: error: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``peftmed`` command line. Every sub-command is registered through the ``register_commands``
hook, the built-in ones included (``peftmed.cli.core_commands``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError, PeftmedError, PluginError
from ..options import parse_bool
from ..plugins import default_registry


@dataclass
class Command:
    """One sub-command: ``configure(parser)`` adds arguments, ``run(args) -> int`` runs it."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


def table(rows: list[list], header: list[str]) -> str:
    """A plain-text table with left-aligned columns (what the listing commands print)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def str2bool(text: str) -> bool:
    """A boolean flag's value (``peftmed.options.parse_bool``) as argparse wants its errors."""
    try:
        return parse_bool(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a batch size, beams, tokens)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def build_parser(registry=None) -> argparse.ArgumentParser:
    registry = registry or default_registry()
    parser = argparse.ArgumentParser(
        prog="peftmed",
        description="Parameter-efficient fine-tuning of medical vision-language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'peftmed COMMAND --help' for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in registry.names("command"):
        cmd = registry.get("command", name)
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.configure(p)
        p.set_defaults(_command=cmd)
    return parser


class Terminated(BaseException):
    """SIGTERM outside a training loop (which handles it itself): stop with a message, not silently."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading


    try:
        registry = default_registry()
    except PluginError as exc:  # strict mode (PEFTMED_STRICT_PLUGINS=1) or a broken built-in
        print(f"peftmed: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser(registry)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    owns_signals = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if owns_signals else None
    try:
        return int(args._command.run(args) or 0)
    except PeftmedError as exc:
        print(f"peftmed {args.command}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: a defect, shown as such
            raise
        # a path that cannot be used (too long a name, no permission, a device that fails): name it
        where = repr(os.fsdecode(exc.filename)) if isinstance(exc.filename, (str, bytes)) else repr(exc.filename)
        print(f"peftmed {args.command}: error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peftmed {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"peftmed {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if owns_signals:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # python -m peftmed.cli
    sys.exit(main())

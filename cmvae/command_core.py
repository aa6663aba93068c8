"""What every `cmvae` command module shares: the one-line error, the parser that reports a bad command
line in one line, and `run`, which turns Ctrl-C, SIGTERM/SIGHUP and user errors into one line and an
exit status. Command modules depend on this core, never on each other or on the top-level parser.

Only the standard library is imported here, so that `cmvae --help` is quick.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import signal
import sys
import threading

DTYPE_NAMES = ("float32", "bfloat16", "float16")
PIPELINE_OPTIONS = ("chunk_frames", "tile", "tile_overlap", "tile_norm")  # defaults: PipelineSettings'


class CommandError(Exception):
    """An error the user can fix; reported in one line with a non-zero exit."""


class Parser(argparse.ArgumentParser):
    """Reports a bad command line in one line, like every other error (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """The pipeline's defaults for the chunk and tile options left unset: imported once the command
        line is parsed (not for --help, which ends the parsing); `pipeline_defaults` names them."""
        namespace, extras = super().parse_known_args(args, namespace)
        if getattr(namespace, "pipeline_defaults", None) == []:
            from .pipeline import PipelineSettings

            defaults = PipelineSettings()
            namespace.pipeline_defaults = [name for name in PIPELINE_OPTIONS if getattr(namespace, name) is None]
            for name in namespace.pipeline_defaults:
                setattr(namespace, name, getattr(defaults, name))
        return namespace, extras


class HelpFormatter(argparse.HelpFormatter):
    """Shows the pipeline's defaults, imported only when help is printed (the import is slow)."""

    def _expand_help(self, action: argparse.Action) -> str:
        if action.dest in PIPELINE_OPTIONS and action.default is None:
            from .pipeline import PipelineSettings

            action = copy.copy(action)
            action.default = getattr(PipelineSettings(), action.dest)
        return super()._expand_help(action)


def new_parser(description: str) -> tuple[Parser, argparse._SubParsersAction]:
    """The `cmvae` parser with its global options; command modules `register` their commands on the second."""
    from . import __version__

    parser = Parser(prog="cmvae", description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    parser.add_argument("--version", action="version", version=f"cmvae {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    return parser, commands


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: stop as on Ctrl-C, removing unfinished outputs on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame) -> None:
    for stop in (signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the clean-up short
        signal.signal(stop, signal.SIG_IGN)
    raise Terminated(signum)


@contextlib.contextmanager
def _stop_signals_as_interrupts():
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {stop: signal.signal(stop, _terminate) for stop in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def _user_error(error: Exception) -> bool:
    """An error to report in one line; anything else is a bug and keeps its traceback."""
    if isinstance(error, (CommandError, ValueError, OSError)):
        return True
    from .text import TextEncoderUnavailable

    return isinstance(error, TextEncoderUnavailable)


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        message = f"{error.filename or ''}: {error.strerror}".lstrip(": ")
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parses `argv` and runs the chosen command: 0, or one line on stderr and a non-zero status."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)  # named before parsing, which can be stopped
    name = f"cmvae {command}" if command else "cmvae"
    with _stop_signals_as_interrupts():
        try:
            args = parser.parse_args(argv)
            logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
            args.run(args)
        except Terminated as stop:
            print(f"{name}: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
            return 128 + stop.signum
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 - user errors in one line, bugs with their traceback
            if not _user_error(error):
                raise
            print(f"{name}: error: {_one_line(error)}", file=sys.stderr)
            return 1
    return 0

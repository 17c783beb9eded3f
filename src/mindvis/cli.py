"""The ``mindvis`` command line.

Each command lives in ``mindvis.commands.<name>`` and registers itself on the Typer app through a
``register(app)`` function. Heavy imports (torch, diffusers) happen inside the command bodies, so
``mindvis --help`` is quick.

Expected failures (:class:`mindvis.errors.MindVisError`) become one line on stderr and exit code 2.
Unexpected ones are written with their traceback to a log file, and the user gets a short pointer to it.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import sys
import tempfile
import traceback
from datetime import datetime

import typer

from mindvis.errors import MindVisError

#: Command modules in the order they appear in ``--help``.
COMMAND_MODULES = [
    "demo",
    "simulate",
    "evaluate",
    "train_classifier",
    "data",
    "pretrain",
    "finetune",
    "train_prior",
    "train",
    "convert",
    "reconstruct",
    "probe",
]

app = typer.Typer(
    name="mindvis",
    help="MinD-Vis: reconstruct the images a person saw from fMRI (masked brain modeling + "
    "double-conditioned latent diffusion).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    setup_logging(level)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the write (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger for the command line (library code never does this)."""
    root = logging.getLogger()
    if not any(getattr(h, "_mindvis", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(
            logging.Formatter("%(levelname).1s %(asctime)s %(name)s: %(message)s", "%H:%M:%S")
        )
        handler._mindvis = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("mindvis").setLevel(level)
    # Lightning prints through its own handlers; don't print its messages a second time through ours
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).propagate = False


for _name in COMMAND_MODULES:
    importlib.import_module(f"mindvis.commands.{_name}").register(app)


#: errno values of environment failures that are reported like expected errors (one line, exit code 2).
_ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)


def _crash_log(exc: BaseException, argv: list[str] | None = None) -> str | None:
    """Write the traceback of an unexpected error to a log file; returns its path (None if it cannot be written)."""
    log_dir = os.environ.get("MINDVIS_LOG_DIR") or os.path.join(tempfile.gettempdir(), "mindvis-logs")
    path = os.path.join(log_dir, f"crash-{datetime.now():%Y%m%d-%H%M%S-%f}-{os.getpid()}.log")
    args = sys.argv[1:] if argv is None else argv
    try:
        os.makedirs(log_dir, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f"mindvis {' '.join(args)}\n\n")
            fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    except OSError:
        return None
    return path


def _one_line(text: str, limit: int | None = 200) -> str:
    """``text`` with its line breaks turned into spaces (other spacing, e.g. in paths, is kept), cut to ``limit``."""
    line = re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def _environment_error(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else None
    reason = exc.strerror or str(exc)
    if where is None:
        return _one_line(reason)
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(where))
    return _one_line(f"{shown}: {reason}", 400)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Returns the exit code."""
    try:
        rc = app(args=argv, prog_name="mindvis", standalone_mode=False)
    except MindVisError as exc:
        typer.echo(f"error: {_one_line(str(exc), None)}", err=True)
        return 2
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            return _internal_error(exc, argv)
        typer.echo(f"error: {_environment_error(exc)}", err=True)
        return 2
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted; finished steps are kept and the run can be resumed", err=True)
        return 130
    except SystemExit as exc:
        if type(exc).__name__ == "SIGTERMException":  # Lightning stops gracefully on SIGTERM, code None
            typer.echo(
                "terminated; the last checkpoint is kept and the run can be resumed with --resume", err=True
            )
            return 143
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception as exc:  # noqa: BLE001 - last-resort reporting
        exit_types, abort_types, click_types = _click_exception_types()
        if isinstance(exc, exit_types):
            return int(getattr(exc, "exit_code", 0) or 0)
        if isinstance(exc, abort_types):
            typer.echo("aborted", err=True)
            return 130
        if isinstance(exc, click_types):
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help was asked for by giving no arguments
                text = exc.format_message() if hasattr(exc, "format_message") else ""
                if text.strip():
                    typer.echo(text)
                return 0
            typer.echo(f"error: {_usage_message(exc)}", err=True)
            return 2
        return _internal_error(exc, argv)
    return rc if isinstance(rc, int) else 0  # click returns typer.Exit's code when not standalone


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(Exit, Abort, ClickException) classes of typer (which ships its own copy of click) and of click."""
    found: tuple[list[type], list[type], list[type]] = ([], [], [])
    for name in ("typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for bucket, attr in zip(found, ("Exit", "Abort", "ClickException"), strict=True):
            cls = getattr(mod, attr, None)
            if isinstance(cls, type) and cls not in bucket:
                bucket.append(cls)
    return tuple(found[0]), tuple(found[1]), tuple(found[2])


def _usage_message(exc: Exception) -> str:
    """A click usage error as one line, with a pointer to the command's help."""
    fmt = getattr(exc, "format_message", None)
    message = fmt() if callable(fmt) else str(exc)
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "mindvis"
    return _one_line(f"{message} (see `{path} --help`)", 400)


def _internal_error(exc: BaseException, argv: list[str] | None) -> int:
    """An unexpected error: one short line on stderr pointing to the log file that holds the traceback."""
    path = _crash_log(exc, argv)
    where = f"traceback in {path}" if path else "the traceback could not be written to a log file"
    typer.echo(f"internal error: {type(exc).__name__}: {_one_line(str(exc))} ({where})", err=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())

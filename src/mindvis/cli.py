"""The ``mindvis`` command line.

Each command lives in ``mindvis.commands.<name>`` and registers itself on the Typer app through a
``register(app)`` function. Heavy imports (torch, diffusers) happen inside the command bodies, so
``mindvis --help`` is quick.

Expected failures (:class:`mindvis.errors.MindVisError`) become one line on stderr and exit code 2.
Unexpected ones are written with their traceback to a log file, and the user gets a short pointer to it.
"""

from __future__ import annotations

import importlib
import logging
import os
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


def _crash_log(exc: BaseException) -> str:
    log_dir = os.environ.get("MINDVIS_LOG_DIR") or os.path.join(tempfile.gettempdir(), "mindvis-logs")
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"crash-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"mindvis {' '.join(sys.argv[1:])}\n\n")
        fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Returns the exit code."""
    try:
        app(args=argv, prog_name="mindvis", standalone_mode=False)
    except MindVisError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted; finished steps are kept and the run can be resumed", err=True)
        return 130
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception as exc:  # noqa: BLE001 - last-resort reporting
        import click

        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        if isinstance(exc, click.ClickException):
            exc.show()
            return 2
        path = _crash_log(exc)
        typer.echo(f"internal error: {type(exc).__name__}: {str(exc)[:200]} (traceback in {path})", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

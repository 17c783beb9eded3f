"""Options and run helpers shared by the training commands of MinD-Vis (Chen et al., CVPR 2023).

``mindvis pretrain`` and ``mindvis finetune`` (stage A1/A2, masked brain modeling) take the same recipe,
preprocessing, hardware and logging options; ``mindvis train`` (stage B) and ``mindvis train-prior`` take the
same hardware and logging options. Each such option is described once here as an :class:`OptionSpec`, and
:func:`add_options` puts a list of them into a command's signature in place of its ``**shared`` parameter:
typer shows them as ordinary options (in the given order, after the command's own), and the command body
receives their values as one dict.

The commands that read an fMRI dataset (``train``, ``reconstruct``, ``probe``, ``finetune``, ``pretrain``) take
``--dataset``, ``--split``, ``--data-dir``, ``--subject`` and ``--roi`` (those they have) from
:func:`dataset_options`, whose help texts are written once; ``add_options``'s ``after`` puts them where the
command lists them (e.g. after ``--out``). Stage A's ``--roi`` is a setting of its config, with the same help text.

A command whose settings are a config dataclass generates their options with :func:`config_options` (the
default and help text are the fields') and collects their values with :func:`config_values`. The stage A
settings (:mod:`mindvis.train.stage_a`) all default to ``None`` = "not given", so that the stage's recipe
supplies the default and, with ``--resume``, the run folder's saved configuration wins over defaults but not
over what is given.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer

from mindvis.config import settings_of
from mindvis.data.formats.registry import DATASET_NAMES, GOD_ROI_HELP
from mindvis.train.stage_a import StageAConfig

F = TypeVar("F", bound=Callable[..., Any])

#: Bounds of every ``--seed``: numpy's and Lightning's seed range (Lightning would silently replace a seed
#: outside it by 0), so a seed beyond it is a one-line usage error rather than a different run.
SEED_RANGE: dict[str, int] = {"min": 0, "max": 2**32 - 1}


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One command-line option.

    Args:
        name: the Python parameter name (the key in the command's ``shared`` dict).
        annotation: its type, e.g. ``int | None``.
        default: the value when the option is not given.
        decls: the option's flags, e.g. ``("--num-nodes",)`` or ``("--progress/--no-progress",)``.
        help: the ``--help`` text (required: ``None`` is refused when the option is added).
        limits: ``min`` / ``max`` of a number option (see :data:`SEED_RANGE`).
        hidden: left out of ``--help`` (an older spelling that still works).
    """

    name: str
    annotation: Any
    default: Any
    decls: tuple[str, ...]
    help: str | None = None
    limits: tuple[tuple[str, int], ...] = ()
    hidden: bool = False

    def parameter(self) -> inspect.Parameter:
        """The keyword-only parameter typer reads this option from."""
        if self.help is None:
            raise TypeError(f"option {self.name} needs a help text for this command")
        return inspect.Parameter(
            self.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                self.default, *self.decls, help=self.help, hidden=self.hidden, **dict(self.limits)
            ),
            annotation=self.annotation,
        )


def add_options(
    specs: Sequence[OptionSpec], *, after: Mapping[str, Sequence[OptionSpec]] | None = None
) -> Callable[[F], F]:
    """Decorator: the command's ``**shared`` parameter becomes the options ``specs``, in order; the options of
    ``after[name]`` go right after the command's own parameter ``name`` (e.g. the :func:`dataset_options` after
    ``out``, where the command has always listed them).

    Typer builds the command from ``inspect.signature``, so the options show in ``--help`` like the
    command's own; the command is called with every option as a keyword, so their values land in ``shared``.

    Raises:
        TypeError: no ``**shared``, an option named like a parameter of the command or added twice, or a key of
            ``after`` that names no parameter of the command.
    """
    placed = dict(after or {})

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        params = list(sig.parameters.values())
        if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
            raise TypeError(f"{func.__name__} must end with a **shared parameter")
        own = params[:-1]
        names = {p.name for p in own}
        added = [s.name for group in (*placed.values(), specs) for s in group]
        clash = [name for name in added if name in names]
        if clash:
            raise TypeError(f"{func.__name__} already has parameters {clash}")
        twice = sorted({name for name in added if added.count(name) > 1})
        if twice:
            raise TypeError(f"options {twice} are added twice to {func.__name__}")
        unknown = sorted(set(placed) - names)
        if unknown:
            raise TypeError(f"{func.__name__} has no parameters {unknown} to add options after")
        # typer passes every value by keyword; from the first placed option on, the command's own parameters
        # turn keyword-only, as no positional parameter may follow a keyword-only one
        out: list[inspect.Parameter] = []
        keyword_only = False
        for p in own:
            out.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if keyword_only else p)
            if p.name in placed:
                out += [s.parameter() for s in placed[p.name]]
                keyword_only = True
        func.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[*out, *(s.parameter() for s in specs)]
        )
        return func

    return decorate


def config_options(
    cls: type, prefix: str = "", limits: Mapping[str, Mapping[str, Any]] | None = None
) -> list[OptionSpec]:
    """The options of the fields of config dataclass ``cls`` declared with :func:`mindvis.config.setting`.

    Each option takes the field's name, type, default and help text, and the flag ``--<name-with-dashes>``
    (``--x/--no-x`` for a bool) unless the field names its own; a ``Literal`` type becomes ``str`` (the
    config's ``__post_init__`` refuses other values with the field named). Fields a command sets another way
    are simply not declared with ``setting``. ``prefix`` goes before each option's parameter name (not its flag), for
    a command that takes the settings of two configs with fields of the same name (whose flags then differ).
    ``limits`` gives typer's bounds of some options by field name (``{"seed": SEED_RANGE, "steps": {"min": 1}}``),
    so that a bad value is a usage error naming the flag before the config is built.

    Raises:
        TypeError: a name in ``limits`` is not a setting of ``cls``.
    """
    limits = dict(limits or {})
    unknown = sorted(set(limits) - {f.name for f in settings_of(cls)})
    if unknown:
        raise TypeError(f"{cls.__name__} has no settings {unknown}")
    hints = typing.get_type_hints(cls)
    specs = []
    for f in settings_of(cls):
        annotation = hints[f.name]
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            annotation = str
        elif any(typing.get_origin(a) is typing.Literal for a in args):
            annotation = str | None
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        if annotation in (bool, bool | None) and "/" not in flag:
            flag = f"{flag}/--no-{flag[2:]}"
        bounds = tuple(limits.get(f.name, {}).items())
        specs.append(
            OptionSpec(prefix + f.name, annotation, f.default, (flag,), f.metadata["help"], limits=bounds)
        )
    return specs


def config_values(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The field values of ``cls`` among a command's ``values`` of its :func:`config_options` options."""
    return {f.name: values[prefix + f.name] for f in settings_of(cls) if prefix + f.name in values}


# ---------------------------------------------------------------------------------------------------------------
# The dataset a command reads (train, reconstruct, probe, finetune, pretrain).
# ---------------------------------------------------------------------------------------------------------------

#: The dataset formats, as the help texts list them: "god, bold5000, nsd, nifti or synthetic".
DATASET_FORMATS = f"{', '.join(DATASET_NAMES[:-1])} or {DATASET_NAMES[-1]}"
#: Where a dataset folder is looked for when ``--data-dir`` is not given (see
#: :func:`mindvis.data.formats.registry.resolve_data_dir`).
DATA_ROOT = "$MINDVIS_DATA, else ~/mindvis_data"

#: Each dataset option by parameter name: its flag, its type when given a value, and its help text.
_DATASET_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "dataset": ("--dataset", str, f"Dataset format: {DATASET_FORMATS} (the simulator's output)."),
    "split": ("--split", str, "Split of --dataset."),
    "data_dir": ("--data-dir", Path, "Folder of --dataset"),  # then its default, unless required, and "."
    "subject": (
        "--subject",
        str,
        "Subject of --dataset in its naming, e.g. sbj_1 (GOD), CSI1 (BOLD5000), subj01 (NSD) (default: the "
        "first).",
    ),
    "roi": ("--roi", str, GOD_ROI_HELP),  # also the help of the stage A configs' roi setting
}
#: The default of ``--split`` (only ``reconstruct`` has it).
_SPLIT_DEFAULT = "test"
#: The options whose shared help text refers to ``--dataset``.
_OF_DATASET = ("split", "data_dir", "subject")


def dataset_options(
    *,
    which: Sequence[str],
    dataset_default: str | None = None,
    required: Collection[str] = (),
    help: Mapping[str, str] | None = None,
) -> list[OptionSpec]:
    """The options of the dataset a command reads, in the order of ``which`` (names among ``dataset``,
    ``split``, ``data_dir``, ``subject``, ``roi``), with the help texts every such command shares.

    Each takes the flag of its name with dashes and defaults to ``None`` (the reader's default, which its help
    text states), except ``dataset`` (``dataset_default``) and ``split`` (``"test"``); an option named in
    ``required`` has no default. ``help`` replaces the shared text of an option whose meaning in the command
    differs (e.g. ``finetune``'s ``--data-dir``, a GOD folder, as it has no ``--dataset``).

    Raises:
        TypeError: an unknown name, a ``dataset_default`` without ``dataset`` or with it required, or an option
            whose shared text refers to ``--dataset`` without it and without its own text.
    """
    texts = dict(help or {})
    unknown = sorted({*which, *required, *texts} - set(_DATASET_OPTIONS))
    if unknown:
        raise TypeError(f"no dataset options {unknown}")
    if not {*required, *texts} <= set(which):
        raise TypeError(f"options {sorted({*required, *texts} - set(which))} are not among {list(which)}")
    if dataset_default is not None and ("dataset" not in which or "dataset" in required):
        raise TypeError("dataset_default is for an optional --dataset")
    if "dataset" not in which:
        orphans = [name for name in which if name in _OF_DATASET and name not in texts]
        if orphans:
            raise TypeError(f"without --dataset, options {orphans} need their own help text")
    specs = []
    for name in which:
        flag, kind, text = _DATASET_OPTIONS[name]
        if name == "data_dir":
            text += (
                "." if name in required else f" (default: its usual folder, e.g. GOD/, under {DATA_ROOT})."
            )
        if name in required:
            default, annotation = ..., kind
        else:
            default = {"dataset": dataset_default, "split": _SPLIT_DEFAULT}.get(name)
            annotation = kind if default is not None else kind | None
        specs.append(OptionSpec(name, annotation, default, (flag,), texts.get(name, text)))
    return specs


_STRATEGY_HELP = "auto (DDP with several devices), ddp, fsdp..."
_COMPILE_HELP = (
    "torch.compile the model's heavy parts before training (on a CPU it needs a C++ compiler, else it is "
    "skipped with a warning); the first steps are slow while graphs compile."
)

# ---------------------------------------------------------------------------------------------------------------
# Stage A (pretrain, finetune): the settings of their configs; every default None = "not given".
# ---------------------------------------------------------------------------------------------------------------


#: The stage A options that are not settings: torch's CPU threads (listed before ``--seed``) ...
_THREADS = OptionSpec(
    "threads", int | None, None, ("--threads",), "CPU threads of torch (default: one per core)."
)
#: ... and, after the settings, the progress bar and what to do with the run folder.
_STAGE_A_RUN = (
    OptionSpec("progress", bool | None, None, ("--progress/--no-progress",), "Show the progress bar."),
    OptionSpec("resume", bool, False, ("--resume",), "Continue the run in --out from checkpoints/last.ckpt."),
    OptionSpec("overwrite", bool, False, ("--overwrite",), "Replace a non-empty --out."),
)


def stage_a_options(cls: type[StageAConfig], hidden: tuple[str, ...] = ()) -> list[OptionSpec]:
    """The options of a stage A command after its paths: the settings of ``cls`` (a
    :class:`~mindvis.train.stage_a.StageAConfig`) that are the stage's own (``--roi`` among them, a setting with
    the help text of every ``--roi``), then the shared ones with ``--threads`` (before ``--seed``, which takes
    :data:`SEED_RANGE`), then ``--progress``, ``--resume`` and ``--overwrite``. The options named in ``hidden``
    still work but are left out of ``--help``.

    Raises:
        TypeError: a name in ``hidden`` is not an option.
    """
    shared = [f.name for f in settings_of(StageAConfig)]
    specs = {s.name: s for s in config_options(cls, limits={"seed": SEED_RANGE})}
    out = [s for name, s in specs.items() if name not in shared]
    for name in shared:
        out += [_THREADS, specs[name]] if name == "seed" else [specs[name]]
    out += _STAGE_A_RUN
    unknown = sorted(set(hidden) - {s.name for s in out})
    if unknown:
        raise TypeError(f"no options {unknown} to hide")
    return [dataclasses.replace(s, hidden=True) if s.name in hidden else s for s in out]


def report_mbm(result: Any, stage: str) -> None:
    """Print the outcome of a stage A run (a :class:`~mindvis.train.mbm.MBMRunResult`)."""
    from rich.console import Console

    console = Console(stderr=False)
    corr = result.best_val_corr
    last = result.metrics.get("val/corr")
    console.print(
        f"[bold green]{stage} finished[/bold green]: {result.epochs_done} epochs, {result.global_step} steps, "
        f"{result.num_samples} samples x {result.num_voxels} voxels, {result.seconds:.0f} s"
    )
    if last is not None:
        start = "" if result.initial_val_corr is None else f"before training {result.initial_val_corr:.4f}, "
        where = (
            " (on rows it also trains on, as the original)"
            if getattr(result, "val_on_training", False)
            else ""
        )
        console.print(
            f"  validation masked-patch correlation{where}: {start}last {last:.4f}, best {corr:.4f}"
        )
    out = result.run_dir
    console.print(f"  weights: {out / 'model'}" + (f" (best: {out / 'best'})" if corr is not None else ""))
    console.print(f"  log: {out / 'metrics.csv'}   checkpoints: {out / 'checkpoints'}")


# ---------------------------------------------------------------------------------------------------------------
# Stage B and the image prior (train, train-prior): hardware and logging, with real defaults.
# ---------------------------------------------------------------------------------------------------------------


def trainer_options(
    *,
    seed: int,
    precision: str,
    precision_help: str,
    logger_help: str,
    log_every: int,
    progress_help: str,
    resume_help: str,
) -> list[OptionSpec]:
    """The hardware, logging and run-folder options of ``train`` and ``train-prior``, with the command's
    defaults and help texts where they differ."""
    return [
        OptionSpec("seed", int, seed, ("--seed",), "Random seed.", limits=tuple(SEED_RANGE.items())),
        OptionSpec("num_workers", int, 0, ("--num-workers",), "Data-loader workers."),
        OptionSpec("threads", int, 0, ("--threads",), "CPU threads of torch (0: its default, one per core)."),
        OptionSpec("accelerator", str, "auto", ("--accelerator",), "auto, cpu, gpu..."),
        OptionSpec("devices", str, "auto", ("--devices",), "auto, a count, or indices like 0,1."),
        OptionSpec("num_nodes", int, 1, ("--num-nodes",), "Machines."),
        OptionSpec("strategy", str, "auto", ("--strategy",), _STRATEGY_HELP),
        OptionSpec("precision", str, precision, ("--precision",), precision_help),
        OptionSpec("compile", bool, False, ("--compile/--no-compile",), _COMPILE_HELP),
        OptionSpec("logger", str, "csv", ("--logger",), logger_help),
        OptionSpec("log_every", int, log_every, ("--log-every",), "Log training metrics every N steps."),
        OptionSpec("progress", bool, True, ("--progress/--no-progress",), progress_help),
        OptionSpec("resume", bool, False, ("--resume",), resume_help),
        OptionSpec("overwrite", bool, False, ("--overwrite",), "Replace a non-empty --out."),
    ]


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when ``threads > 0`` (0 keeps torch's default)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def trainer_config(shared: dict[str, Any]) -> Any:
    """The :class:`~mindvis.train.common.TrainerConfig` of the :func:`trainer_options` values."""
    from mindvis.train.common import TrainerConfig

    return TrainerConfig(
        accelerator=shared["accelerator"],
        devices=shared["devices"],
        num_nodes=shared["num_nodes"],
        strategy=shared["strategy"],
        precision=shared["precision"],
        compile=shared["compile"],
        logger=shared["logger"],
        progress_bar=shared["progress"],
        log_every_n_steps=shared["log_every"],
    )


def load_classifier_option(path: Path | None) -> Any:
    """A benchmark classifier folder (``mindvis`` classifier format), or ``None``."""
    if path is None:
        return None
    from mindvis.eval.classifier import BenchmarkClassifier

    return BenchmarkClassifier.load(path)

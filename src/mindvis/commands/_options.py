"""Options and run helpers shared by the training commands of MinD-Vis (Chen et al., CVPR 2023).

``mindvis pretrain`` and ``mindvis finetune`` (stage A1/A2, masked brain modeling) take the same recipe,
preprocessing, hardware and logging options; ``mindvis train`` (stage B) and ``mindvis train-prior`` take the
same hardware and logging options. Each such option is described once here as an :class:`OptionSpec`, and
:func:`add_options` puts a list of them into a command's signature in place of its ``**shared`` parameter:
typer shows them as ordinary options (in the given order, after the command's own), and the command body
receives their values as one dict.

The stage A options all default to ``None`` = "not given", so that the stage's recipe supplies the default and,
with ``--resume``, the run folder's saved configuration wins over defaults but not over what is given.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from mindvis.config import settings_of
from mindvis.errors import ConfigError

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
        help: the ``--help`` text; ``None`` when each command must give its own (see :func:`with_help`).
        key: the dotted run-configuration key it sets (``"data.nan_policy"``), for stage A options.
        limits: ``min`` / ``max`` of a number option (see :data:`SEED_RANGE`).
        hidden: left out of ``--help`` (an older spelling that still works).
    """

    name: str
    annotation: Any
    default: Any
    decls: tuple[str, ...]
    help: str | None = None
    key: str | None = None
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


def add_options(specs: list[OptionSpec]) -> Callable[[F], F]:
    """Decorator: the command's ``**shared`` parameter becomes the options ``specs``, in order.

    Typer builds the command from ``inspect.signature``, so the options show in ``--help`` like the
    command's own; the command is called with every option as a keyword, so their values land in ``shared``.
    """

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        params = list(sig.parameters.values())
        if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
            raise TypeError(f"{func.__name__} must end with a **shared parameter")
        own = {p.name for p in params}
        clash = [s.name for s in specs if s.name in own]
        if clash:
            raise TypeError(f"{func.__name__} already has parameters {clash}")
        func.__signature__ = sig.replace(  # type: ignore[attr-defined]
            parameters=[*params[:-1], *(s.parameter() for s in specs)]
        )
        return func

    return decorate


def config_options(cls: type, prefix: str = "") -> list[OptionSpec]:
    """The options of the fields of config dataclass ``cls`` declared with :func:`mindvis.config.setting`.

    Each option takes the field's name, type, default and help text, and the flag ``--<name-with-dashes>``
    (``--x/--no-x`` for a bool) unless the field names its own; a ``Literal`` type becomes ``str`` (the
    config's ``__post_init__`` refuses other values with the field named). Fields a command sets another way
    are simply not declared with ``setting``. ``prefix`` goes before each option's parameter name (not its flag), for
    a command that takes the settings of two configs with fields of the same name (whose flags then differ).
    """
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
        if annotation is bool and "/" not in flag:
            flag = f"{flag}/--no-{flag[2:]}"
        specs.append(OptionSpec(prefix + f.name, annotation, f.default, (flag,), f.metadata["help"]))
    return specs


def config_values(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The field values of ``cls`` among a command's ``values`` of its :func:`config_options` options."""
    return {f.name: values[prefix + f.name] for f in settings_of(cls) if prefix + f.name in values}


def with_help(specs: tuple[OptionSpec, ...], **helps: str) -> list[OptionSpec]:
    """``specs`` with the help texts ``helps`` (by option name) replacing theirs.

    Raises:
        TypeError: a name in ``helps`` is not an option of ``specs``.
    """
    names = {s.name for s in specs}
    unknown = sorted(set(helps) - names)
    if unknown:
        raise TypeError(f"no options {unknown} here; options: {sorted(names)}")
    return [dataclasses.replace(s, help=helps[s.name]) if s.name in helps else s for s in specs]


_STRATEGY_HELP = "auto (DDP with several devices), ddp, fsdp..."
_COMPILE_HELP = (
    "torch.compile the model's heavy parts before training (on a CPU it needs a C++ compiler, else it is "
    "skipped with a warning); the first steps are slow while graphs compile."
)

# ---------------------------------------------------------------------------------------------------------------
# Stage A (pretrain, finetune): recipe, preprocessing, hardware and logging; every default None = "not given".
# ---------------------------------------------------------------------------------------------------------------


def _stage_a(
    name: str,
    kind: type,
    help: str | None = None,
    key: str | None = None,
    limits: dict[str, int] | None = None,
) -> OptionSpec:
    """A stage A option: type ``kind | None``, default ``None``, flag ``--name-with-dashes`` (``--x/--no-x`` for
    a bool), configuration key ``key`` (default ``name``). Help ``None``: each command says its own default."""
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        flag = f"{flag}/--no-{flag[2:]}"
    return OptionSpec(name, kind | None, None, (flag,), help, key or name, tuple((limits or {}).items()))


MBM_RUN_OPTIONS: tuple[OptionSpec, ...] = (
    _stage_a("epochs", int),
    _stage_a("batch_size", int),
    _stage_a("lr", float),
    _stage_a("min_lr", float, "Final learning rate (default: 0)."),
    _stage_a("weight_decay", float, "AdamW weight decay (default: 0.05)."),
    _stage_a("warmup_epochs", float),
    _stage_a("clip_grad", float, "Gradient-norm clip, 0 = off (default: 0.8)."),
    _stage_a("mask_ratio", float, "Fraction of patches masked (default: 0.75)."),
    _stage_a("accumulate", int, "Batches per optimizer step (default: 1)."),
    _stage_a("include_test_fmri", bool, key="data.include_test_fmri"),
    _stage_a(
        "nan_policy",
        str,
        "NaN/Inf voxels: error (default), zero (set to the mean) or drop (remove voxel).",
        key="data.nan_policy",
    ),
    _stage_a("normalize", str, key="data.normalize"),
    _stage_a(
        "pad_mode",
        str,
        "Padding to whole patches: auto (default: original when finetuning an original checkpoint, or a model "
        "whose voxel count is the original rule's; else wrap), wrap (ours: up to the next multiple of the patch "
        "size), original (the original code's: always p - V mod p more voxels, a whole extra patch when V is a "
        "multiple of p, statistics fitted after padding), constant or cut.",
        key="data.pad_mode",
    ),
    _stage_a("val_fraction", float, key="data.val_fraction"),
    _stage_a("val_every", int, "Validate every N epochs (default: 1).", key="trainer.val_every_n_epochs"),
    _stage_a("accelerator", str, "auto (default), cpu, gpu...", key="trainer.accelerator"),
    _stage_a("devices", str, "auto (default), a count, or indices like 0,1.", key="trainer.devices"),
    _stage_a("num_nodes", int, "Machines (default: 1).", key="trainer.num_nodes"),
    _stage_a("strategy", str, _STRATEGY_HELP, key="trainer.strategy"),
    _stage_a(
        "precision",
        str,
        "auto (bf16-mixed on GPUs, 32 on CPUs), 32-true, bf16-mixed, 16-mixed.",
        key="trainer.precision",
    ),
    _stage_a("compile", bool, _COMPILE_HELP + " Default: off.", key="trainer.compile"),
    _stage_a("num_workers", int, "Data-loader workers (default: 0)."),
    OptionSpec("threads", int | None, None, ("--threads",), "CPU threads of torch (default: one per core)."),
    _stage_a("seed", int, "Random seed (default: 2022).", limits=SEED_RANGE),
    _stage_a("logger", str, "csv (default), tensorboard or wandb (both add the CSV).", key="trainer.logger"),
    _stage_a("progress", bool, "Show the progress bar.", key="trainer.progress_bar"),
    OptionSpec("resume", bool, False, ("--resume",), "Continue the run in --out from checkpoints/last.ckpt."),
    OptionSpec("overwrite", bool, False, ("--overwrite",), "Replace a non-empty --out."),
)

#: Stage A options that may differ from the saved configuration when a run is resumed.
RESUME_MUTABLE = {
    "epochs",
    "num_workers",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.precision",
    "trainer.compile",
    "trainer.accelerator",
    "trainer.logger",
    "trainer.progress_bar",
}


def mbm_run_options(hidden: tuple[str, ...] = (), **helps: str) -> list[OptionSpec]:
    """The stage A options, with the stage's help texts for the options whose default depends on the stage
    (``epochs``, ``batch_size``, ``lr``, ``warmup_epochs``, ``include_test_fmri``, ``normalize``,
    ``val_fraction``); the options named in ``hidden`` still work but are left out of ``--help``."""
    specs = with_help(MBM_RUN_OPTIONS, **helps)
    missing = [s.name for s in specs if s.help is None]
    if missing:
        raise TypeError(f"give the help texts of {missing}")
    unknown = sorted(set(hidden) - {s.name for s in specs})
    if unknown:
        raise TypeError(f"no options {unknown} to hide")
    return [dataclasses.replace(s, hidden=True) if s.name in hidden else s for s in specs]


def given_run_options(shared: dict[str, Any]) -> dict[str, Any]:
    """The stage A options that were given, as dotted configuration keys (``"lr"``, ``"data.nan_policy"``,
    ``"trainer.devices"``); ``resume`` and ``overwrite`` are not configuration and are left out."""
    return {
        s.key: shared[s.name] for s in MBM_RUN_OPTIONS if s.key is not None and shared.get(s.name) is not None
    }


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"data.x": 1, "lr": 2}`` -> ``{"data": {"x": 1}, "lr": 2}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, tail = key.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = value
        else:
            out[key] = value
    return out


def resolve_config(stage: str, out: Path, resume: bool, given: dict[str, Any]) -> Any:
    """The stage A run configuration (:class:`~mindvis.train.mbm.MBMTrainConfig`): the stage's defaults with
    the given options, or, with ``resume``, the saved configuration with the given options that may change on
    resume (others must equal the saved values).

    Raises:
        ConfigError: ``resume`` and a given option differs from the saved one and may not change.
    """
    from mindvis.train.mbm import MBMTrainConfig
    from mindvis.train.run_folder import read_run_config

    if not resume:
        return MBMTrainConfig.for_stage(stage, **nest(given))  # type: ignore[arg-type]
    saved = read_run_config(out, stage)["config"]
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
    for key, value in given.items():
        head, _, tail = key.partition(".")
        current = merged.get(head, {}).get(tail) if tail else merged.get(head)
        if key not in RESUME_MUTABLE and _normalise(current) != _normalise(value):
            raise ConfigError(
                f"cannot change {key} when resuming (the run was started with {current!r}); start a new run instead",
                field=key,
            )
        if tail:
            merged.setdefault(head, {})[tail] = value
        else:
            merged[key] = value
    return MBMTrainConfig.from_dict(merged)


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, str) and os.path.exists(value):
        return str(Path(value).resolve())
    return value


def run_mbm(
    stage: str, out: Path, given: dict[str, Any], resume: bool, overwrite: bool, threads: int | None = None
) -> None:
    """Resolve the configuration of stage A ``stage`` (``"pretrain"`` or ``"finetune"``), train with ``threads``
    torch CPU threads (``None``: torch's default), and print the outcome (on the primary process)."""
    from mindvis.train.mbm import run_mbm_stage
    from mindvis.train.processes import is_primary_process

    set_threads(threads or 0)

    config = resolve_config(stage, out, resume, given)
    result = run_mbm_stage(config, out, resume=resume, overwrite=overwrite)
    if is_primary_process():
        report_mbm(result, stage)


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

"""Every place where mindvis can behave otherwise than the original MinD-Vis code, in one table.

Each :class:`Departure` names the command option that selects it, the option's value that gives the original's
behaviour, and why the other behaviour exists. ``docs/departures.md`` shows this table (a test keeps the two
equal and checks that each option's real default is the one stated), and :func:`in_force` lists the departures
that a ``mindvis demo`` preset turns on, for its report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Departure:
    """One behaviour that differs from the original.

    Args:
        command: the ``mindvis`` command (``"train"``), or ``"evaluate"`` etc.
        option: the option that selects it (``"--sparse-rate"``); empty when no option does.
        original: the option value that gives the original's behaviour (as ``--help`` shows it), or ``""``.
        default_is_original: whether the command's default is the original's behaviour.
        what: the behaviour, in a few words.
        behaviour_original: what the original does.
        behaviour_ours: what the other setting does.
        reason: why the other setting exists.
        preset_step: the demo preset section holding ``option`` (``"train"``), for :func:`in_force`.
        unset: what the option resolves to in a demo run that does not give it, where that is not the
            command's fixed default (the guidance scale a model recorded).
    """

    command: str
    option: str
    original: str
    default_is_original: bool
    what: str
    behaviour_original: str
    behaviour_ours: str
    reason: str
    preset_step: str = ""
    unset: str | None = None

    def active(self, settings: dict[str, Any]) -> bool:
        """Whether a preset section's ``settings`` select the departure (the option given, not the original's)."""
        key = self.option.removeprefix("--")
        value = settings.get(key)
        if value is None:
            if self.unset is None:
                return not self.default_is_original
            value = self.unset
        if isinstance(value, bool):
            return str(value).lower() != self.original.lower()
        try:
            return float(value) != float(self.original)
        except (TypeError, ValueError):
            return str(value) != self.original


DEPARTURES: tuple[Departure, ...] = (
    Departure(
        "finetune",
        "--a2-data",
        "original",
        True,
        "stage A2 data",
        "the target subject's test fMRI only (averaged and single-trial rows), 15 epochs, 2 warm-up epochs; "
        "validated on rows it also trains on",
        "the training fMRI, 5 % held out for validation (`train+test` adds the single-trial test rows)",
        "the test fMRI stays unseen until evaluation, and validation measures generalisation, not fit",
        "finetune",
    ),
    Departure(
        "pretrain",
        "--pad-mode",
        "original",
        False,
        "padding to whole patches (stage A1)",
        "always p - V mod p more voxels (a whole extra patch when V is a multiple of p), statistics fitted after "
        "padding",
        "`wrap`: up to the next multiple of p, statistics before padding; `finetune --pad-mode auto` (its "
        "default) uses the original's rule for original checkpoints",
        "no redundant patch; an original checkpoint still gets the patch count it was trained with",
    ),
    Departure(
        "finetune",
        "",
        "",
        False,
        "test-set normalisation (`test_normalize` in preprocess.json)",
        "the test fMRI normalised by the statistics of the already-normalised training fMRI (about 0 and 1: in "
        "effect not normalised)",
        "`train`: the raw training statistics; `original` is used with `--a2-data original` and for "
        "reconstruction from a converted original model",
        "keeps the test fMRI on the training fMRI's scale",
    ),
    Departure(
        "train",
        "--sparse-rate",
        "0",
        True,
        "sparse voxel dropout in stage B",
        "a no-op (its draw picks rows of a (1, V) array, so no voxel is dropped)",
        "20 % of the voxels of each training sample zeroed (also in the warm start)",
        "does what the paper describes, as augmentation for the small training sets",
        "train",
    ),
    Departure(
        "train",
        "--val-schedule",
        "original",
        True,
        "stage B validation",
        "every 5 epochs a quick pass on 5 items x 3 samples; the full test pass when top-1 > 0.15 "
        "or every 15th validation",
        "the full pass (every item, --num-samples each) at every validation, about 16 times the compute",
        "short runs get a comparable curve at every validation",
        "train",
    ),
    Departure(
        "train",
        "--standardize-tokens",
        "False",
        True,
        "token standardisation",
        "the encoder tokens go to the conditioner as they are",
        "tokens standardised with training statistics",
        "a tiny encoder's tokens vary little between samples (docs/synthcortex.md)",
        "train",
    ),
    Departure(
        "train",
        "--align-epochs",
        "0",
        True,
        "context warm start",
        "none: stage B learns from the diffusion loss alone",
        "the encoder and conditioner first map each training fMRI to the prior's embedding of its image's class "
        "(training labels only)",
        "with a weak prior the label-free loss barely depends on the context (docs/synthcortex.md)",
        "train",
    ),
    Departure(
        "train",
        "--cond-dropout",
        "0",
        True,
        "conditioning dropout",
        "none",
        "the null context in place of the fMRI context for a fraction of the samples",
        "needed for classifier-free guidance when sampling",
        "train",
    ),
    Departure(
        "reconstruct",
        "--guidance-scale",
        "1",
        False,
        "classifier-free guidance",
        "none (scale 1)",
        "guided sampling; the default is the scale the model recorded, which is 1 unless it was trained with "
        "--cond-dropout",
        "sharpens the class with a weak prior",
        "reconstruct",
        unset="1",  # the demo's models record 1 unless trained with --cond-dropout, and then it gives the scale
    ),
    Departure(
        "reconstruct",
        "--sampler",
        "plms",
        False,
        "sampler",
        "PLMS with 250 steps",
        "DPM-Solver++ with 25 steps",
        "a tenth of the UNet calls at PLMS-250's measured quality (docs/performance.md)",
        "reconstruct",
    ),
    Departure(
        "evaluate",
        "",
        "",
        False,
        "pairwise MSE",
        "`np.square(a - b).mean()` on uint8 images: the difference and the square wrap modulo 256",
        "a true MSE on [0, 1] floats (`pixel_mse`, `ident_mse_*`); the original's is reported separately as "
        "`*_mse_uint8_original*`",
        "a wrapped value is not a squared error; the original's figure stays for comparison with published numbers",
    ),
    Departure(
        "train",
        "--subject",
        "",
        False,
        "GOD subject when the folder has no sbj_3",
        "fails (sbj_3 is fixed in the code)",
        "the first subject, with a warning (with sbj_3 present the default is sbj_3, as the original)",
        "folders holding only some subjects stay usable",
    ),
)


def in_force(preset: Any) -> list[Departure]:
    """The departures a demo preset's settings select (``preset.options(step)``: a step's settings by option name,
    see :meth:`mindvis.demo_presets.DemoPreset.options`)."""
    return [d for d in DEPARTURES if d.preset_step and d.active(preset.options(d.preset_step))]


def markdown_table() -> str:
    """The table of ``docs/departures.md``."""
    rows = [
        "| command | option (original's value) | what | the original | mindvis's other setting | default | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in DEPARTURES:
        option = (
            f"`{d.option}` ({d.original})"
            if d.option and d.original
            else (f"`{d.option}`" if d.option else "–")
        )
        default = "the original's" if d.default_is_original else "mindvis's"
        rows.append(
            f"| `{d.command}` | {option} | {d.what} | {d.behaviour_original} | {d.behaviour_ours} | {default} | "
            f"{d.reason} |"
        )
    return "\n".join(rows) + "\n"

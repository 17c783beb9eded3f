"""The demo's presets: the config of every step of ``mindvis demo`` (:class:`DemoPreset`), ``--set`` on them
(:func:`apply_overrides`), and the command line that makes a run again, written from the configs
(:func:`reproduce_line`). :mod:`mindvis.demo` runs the steps.

Each section of a preset is the typed config that one step's library call takes, the config that the ``mindvis``
command of the same step builds from its options: ``simulate`` (:class:`~mindvis.synthcortex.SynthConfig`),
``classifier`` (:class:`~mindvis.eval.classifier.ClassifierConfig`), ``pretrain`` and ``finetune`` (stage A),
``prior`` (:class:`~mindvis.train.config.PriorTrainConfig`), ``train`` (:class:`~mindvis.train.config.StageBConfig`),
``reconstruct`` and ``evaluate``.
"""

from __future__ import annotations

import copy
import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mindvis.config import change_config, config_from_plain, config_to_dict, flatten, option_paths
from mindvis.errors import ConfigError
from mindvis.eval.classifier import ClassifierConfig, classifier_config
from mindvis.eval.config import EvaluateConfig
from mindvis.reconstruct import ReconstructConfig
from mindvis.synthcortex.config import OPTION_FIELDS as SIMULATE_OPTION_FIELDS
from mindvis.synthcortex.config import SynthConfig
from mindvis.train.config import PriorTrainConfig, StageBConfig, UNetTrainConfig, VQTrainConfig
from mindvis.train.stage_a import FinetuneConfig, PretrainConfig
from mindvis.utils.io import atomic_write
from mindvis.utils.steps import provenance

Ablations = Literal["none", "fast", "all"]

#: The sections of a preset that ``--set`` may change, each a config of one step (``ablation_train`` holds the
#: :class:`StageBConfig` fields that the ablations' stage B trainings change).
SECTIONS = (
    "simulate",
    "classifier",
    "pretrain",
    "finetune",
    "prior",
    "train",
    "ablation_train",
    "reconstruct",
    "evaluate",
)


@dataclass
class DemoPreset:
    """The config of every step of one demo run, and which ablations it runs."""

    name: str
    simulate: SynthConfig
    classifier: ClassifierConfig
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    prior: PriorTrainConfig
    train: StageBConfig
    reconstruct: ReconstructConfig
    evaluate: EvaluateConfig
    #: the :class:`StageBConfig` fields the ablations' trainings change from ``train`` (e.g. fewer epochs)
    ablation_train: dict[str, Any] = field(default_factory=dict)
    ablations: Ablations = "fast"
    note: str = ""
    #: the ``--set`` items applied to the named preset, in order (see :func:`apply_overrides`)
    overrides: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The effective settings as plain data (the ``--set`` items already applied; they are listed apart)."""
        out: dict[str, Any] = {"name": self.name}
        for section in SECTIONS:
            out[section] = config_to_dict(getattr(self, section))
        out.update(ablations=self.ablations, note=self.note)
        return out

    def options(self, section: str) -> dict[str, Any]:
        """The settings of ``section`` by the name of the command-line option that sets each (``"align-epochs"``),
        for the table of departures (:mod:`mindvis.departures`)."""
        config = self.train if section == "ablation_train" else getattr(self, section)
        if section == "ablation_train":
            config = dataclasses.replace(config, **self.ablation_train)
        out = {}
        for option, path in _option_paths(type(config)).items():
            value: Any = config
            for part in path.split("."):
                value = getattr(value, part)
            out[option.replace("_", "-")] = value
        return out


def _option_paths(cls: type) -> dict[str, str]:
    """``{option: field path}`` of a step's config, the option names written as the step's command spells them."""
    out = option_paths(cls)
    if cls is SynthConfig:
        out.update(SIMULATE_OPTION_FIELDS)
    if cls is ClassifierConfig:
        out["holdout"] = "holdout_fraction"
    return out


#: The tiny prior's 32-channel layers with 32 GroupNorm groups normalise each channel alone, which erases the
#: time embedding; the demo's tiny priors use 8 groups (see mindvis.train.config.warn_instance_norm).
_TINY_NORM = {"norm_groups": 8}


#: Stage B settings of every preset that are not the original's (docs/departures.md): sparse voxel dropout, which
#: the original describes but whose code is a no-op, and a full validation pass each time, so that the short
#: demo runs have a comparable curve at every validation. The paper-sized ``full`` preset keeps the original's.
_OUR_STAGE_B = {"sparse_rate": 0.2, "val_schedule": "full", "dataset": "synthetic"}
#: Stage A2 on the training fMRI (the original tunes on the test fMRI): the demo's test set stays unseen until
#: evaluation, and its figures stay comparable with the README's.
_OUR_STAGE_A2 = {"a2_data": "train"}


def _prior(
    preset: str, *, vq: dict | None = None, unet: dict | None = None, **fields: Any
) -> PriorTrainConfig:
    return PriorTrainConfig(
        preset=preset, vq=VQTrainConfig(**(vq or {})), unet=UNetTrainConfig(**(unet or {})), **fields
    )


def _presets() -> dict[str, DemoPreset]:
    quick = DemoPreset(
        name="quick",
        note="smoke test: small everything, a few epochs; numbers are not meaningful",
        simulate=SynthConfig.preset(
            n_train=240,
            n_test=10,
            n_repeats=8,
            n_rest_subjects=4,
            n_trs=300,
            voxels=1024,
            rest_vertices=800,
            corpus_size=600,
            resolution=32,
            seed=0,
        ),
        classifier=classifier_config(epochs=3),
        pretrain=PretrainConfig(variant="tiny", epochs=2, batch_size=32),
        finetune=FinetuneConfig(epochs=2, batch_size=16, **_OUR_STAGE_A2),
        prior=_prior(
            "tiny",
            vq_model=_TINY_NORM,
            unet_model=_TINY_NORM,
            vq_epochs=1,
            unet_epochs=1,
            final_samples_per_class=1,
            unet={"sample_steps": 5, "samples_per_class": 1},
        ),
        train=StageBConfig(
            epochs=1,
            batch_size=8,
            val_every=1,
            num_samples=2,
            sampler="dpmsolver++",
            sample_steps=5,
            val_items=4,
            **_OUR_STAGE_B,
        ),
        reconstruct=ReconstructConfig(num_samples=2, sampler="dpmsolver++", steps=10),
        ablations="none",
        evaluate=EvaluateConfig(trials=200, bootstrap=200),
    )
    default = DemoPreset(
        name="default",
        note="the embedded benchmark at GOD's trial counts with a 1.5k-voxel visual cortex, 32-pixel stimuli and "
        "tiny models, sized for 2 CPU cores",
        simulate=SynthConfig.preset(
            seed=0, n_rest_subjects=10, voxels=1500, rest_vertices=1200, resolution=32, corpus_size=3000
        ),
        classifier=classifier_config(epochs=20),
        pretrain=PretrainConfig(variant="tiny", epochs=30, batch_size=64),
        finetune=FinetuneConfig(epochs=60, batch_size=32, **_OUR_STAGE_A2),
        # what scripts/build_prior.py trains for the shipped prior (used unless --train-prior)
        prior=_prior(
            "tiny",
            vq_model={**_TINY_NORM, "n_embed": 512},
            unet_model=_TINY_NORM,
            vq_epochs=15,
            vq={"lr": 5e-4},
            unet_epochs=40,
            unet_batch_size=64,
            unet={"lr": 4e-4, "sample_steps": 20, "samples_per_class": 2},
            val_every=10,
            final_samples_per_class=4,
        ),
        # Not in the original, each for a measured reason (docs/synthcortex.md, "Why the demo needs a warm start"):
        # the tiny encoder's tokens vary little between samples, so they are standardised; a fresh conditioner
        # gives contexts the prior's cross-attention ignores, so it is first aligned to the prior's class
        # embeddings; and the weak tiny prior is sharpened by classifier-free guidance.
        train=StageBConfig(
            epochs=12,
            batch_size=16,
            val_every=4,
            num_samples=2,
            sampler="dpmsolver++",
            sample_steps=15,
            val_items=20,
            standardize_tokens=True,
            align_epochs=100,
            cond_dropout=0.1,
            guidance_scale=3.0,
            validate_start=True,
            **_OUR_STAGE_B,
        ),
        reconstruct=ReconstructConfig(num_samples=5, sampler="dpmsolver++", steps=25, guidance_scale=3.0),
        ablation_train={"epochs": 12, "validate_start": False},
        ablations="fast",
        evaluate=EvaluateConfig(trials=1000, bootstrap=1000),
    )
    full = DemoPreset(
        name="full",
        note="paper-sized models and schedules; for a GPU",
        simulate=SynthConfig.preset(seed=0),
        classifier=classifier_config(epochs=20),
        pretrain=PretrainConfig(variant="large", epochs=500, batch_size=100),
        finetune=FinetuneConfig(epochs=200),
        prior=_prior("small", vq_epochs=40, unet_epochs=200),
        train=StageBConfig(
            epochs=500,
            val_every=5,
            num_samples=5,
            sampler="dpmsolver++",
            sample_steps=25,
            dataset="synthetic",
        ),
        reconstruct=ReconstructConfig(num_samples=5, sampler="plms", steps=250),
        ablation_train={"epochs": 200},
        ablations="all",
        evaluate=EvaluateConfig(trials=1000, bootstrap=1000),
    )
    return {p.name: p for p in (quick, default, full)}


PRESETS = _presets()


def get_preset(name: str) -> DemoPreset:
    """The preset ``name`` (:data:`PRESETS`), or the preset in the YAML file ``name`` (:func:`load_preset_file`;
    its :attr:`DemoPreset.name` is then the file's absolute path, so that a run made with it continues with it).

    Raises:
        ConfigError: neither a preset name nor a preset file; or the file's error.
    """
    if name in PRESETS:
        return copy.deepcopy(PRESETS[name])
    if Path(name).suffix.lower() in (".yaml", ".yml") or Path(name).is_file():
        return load_preset_file(name)
    raise ConfigError(
        f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}, or a preset file (.yaml)",
        field="preset",
    )


#: The config class of each section of a preset.
SECTION_TYPES: dict[str, type] = {
    "simulate": SynthConfig,
    "classifier": ClassifierConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "prior": PriorTrainConfig,
    "train": StageBConfig,
    "reconstruct": ReconstructConfig,
    "evaluate": EvaluateConfig,
}


def preset_from_dict(data: Any, name: str, source: Any = None) -> DemoPreset:
    """A preset from plain data (:meth:`DemoPreset.to_dict`'s): each section a mapping of its config's fields (a
    missing field keeps the config's default), ``ablation_train`` a mapping of stage B fields, ``ablations``
    and ``note``. ``name`` becomes the preset's name.

    Raises:
        ConfigError: an unknown or missing section, an unknown field or a value its config refuses (the error
            names ``source`` and the field).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of preset sections, got {data!r}", path=source)
    known = {*SECTION_TYPES, "ablation_train", "ablations", "note", "name"}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(unknown)}; a preset has: {', '.join(sorted(known))}",
            path=source,
            field=unknown[0],
        )
    sections = {}
    for section, cls in SECTION_TYPES.items():
        given = data.get(section) or {}
        try:
            sections[section] = config_from_plain(cls, given, source)
            if cls is SynthConfig:  # a noise preset's values, then the fields the file gives
                sim = sections[section]
                sections[section] = SynthConfig.preset(
                    sim.name, **{k: getattr(sim, k) for k in given if k != "name"}
                )
        except ConfigError as exc:
            raise ConfigError(
                exc.detail, path=source, field=f"{section}.{exc.field}" if exc.field else section
            ) from None
    ablations = data.get("ablations", "fast")
    if ablations not in ("none", "fast", "all"):
        raise ConfigError(f"expected none, fast or all, got {ablations!r}", path=source, field="ablations")
    preset = DemoPreset(name=name, **sections, ablations=ablations, note=str(data.get("note") or ""))
    abl = data.get("ablation_train") or {}
    if not isinstance(abl, dict):
        raise ConfigError(
            f"expected a mapping of stage B fields, got {abl!r}", path=source, field="ablation_train"
        )
    for key, value in abl.items():
        try:
            _with_change(
                preset, "ablation_train", _field_path("ablation_train", preset.train, str(key)), value
            )
        except ConfigError as exc:
            raise ConfigError(exc.detail, path=source, field=f"ablation_train.{key}") from None
    return preset


def load_preset_file(path: str | Path) -> DemoPreset:
    """The preset in YAML file ``path``: the settings of :func:`preset_from_dict`, or a demo run's ``config.yaml``
    (its ``mindvis_demo.settings``, so that a run's settings make a preset). The preset's name is the file's
    absolute path.

    Raises:
        ConfigError: the file is missing, not YAML, or not a preset (naming the file and the field).
    """
    path = Path(path).expanduser().absolute()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cannot read the preset file ({exc.strerror})", path=path, field="preset"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not a YAML file ({exc})", path=path, field="preset") from None
    if isinstance(data, dict) and isinstance(data.get("mindvis_demo"), dict):
        data = data["mindvis_demo"].get("settings")
    return preset_from_dict(data, str(path), source=path)


#: Fields that the demo sets itself (from another step's output, or per ablation): ``--set`` may not change them.
_DEMO_OWNED: dict[str, dict[str, str]] = {
    "prior": {"resolution": "it follows simulate.resolution"},
    "train": {
        "dataset": "the demo's data is SynthCortex",
        "encoder_init": "the no-pretraining ablation sets it",
    },
    "ablation_train": {
        "dataset": "the demo's data is SynthCortex",
        "encoder_init": "the no-pretraining ablation sets it",
        "use_time_cond": "the conditioning ablations set it",
        "use_cross_attn": "the conditioning ablations set it",
    },
}


def _section_config(preset: DemoPreset, section: str) -> Any:
    if section == "ablation_train":
        return dataclasses.replace(preset.train, **preset.ablation_train)
    return getattr(preset, section)


def _field_path(section: str, config: Any, key: str) -> str:
    """The dotted field path that ``key`` (a field path, or the name of the step command's option) names."""
    fields = {f.name for f in dataclasses.fields(config) if f.init}
    aliases = _option_paths(type(config))
    norm = key.strip().lstrip("-").replace("-", "_")
    path = norm if norm.partition(".")[0] in fields else aliases.get(norm)
    if path is None:
        known = sorted(fields | set(aliases))
        raise ConfigError(
            f"{section}.{key}: {section} ({type(config).__name__}) has no setting {key!r}; it has: {', '.join(known)}",
            field="--set",
        )
    owned = _DEMO_OWNED.get(section, {})
    if path in owned:
        raise ConfigError(f"{section}.{key}: the demo sets {path} itself ({owned[path]})", field="--set")
    return path


def _parse_value(section: str, key: str, raw: str) -> Any:
    raw = raw.strip()
    if raw in ("null", "~"):
        return None
    if not raw:
        raise ConfigError(f"{section}.{key}: give a value (or null for the default)", field="--set")
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _with_change(preset: DemoPreset, section: str, path: str, value: Any) -> None:
    """Set ``path`` of ``section`` to ``value`` in place (checked by the section's config)."""
    if section == "ablation_train":
        if "." in path:
            raise ConfigError(
                f"ablation_train.{path}: set a field of the stage B config itself", field="--set"
            )
        if value is None:  # the train value applies again
            preset.ablation_train.pop(path, None)
            return
        changed = change_config(_section_config(preset, section), path, value)
        preset.ablation_train[path] = getattr(changed, path)
        return
    config = getattr(preset, section)
    if section == "simulate" and path == "name":  # a noise preset: its values, with the fields set apart kept
        if value is None:
            value = "realistic"
        base = config_to_dict(SynthConfig.preset(config.name))
        mine = {k: v for k, v in config_to_dict(config).items() if base.get(k) != v and k != "name"}
        keep = {f.name for f in dataclasses.fields(SynthConfig) if f.init}
        setattr(
            preset, section, SynthConfig.preset(str(value), **{k: v for k, v in mine.items() if k in keep})
        )
        return
    setattr(preset, section, change_config(config, path, value))


def apply_overrides(preset: DemoPreset, items: list[str]) -> DemoPreset:
    """A copy of ``preset`` with ``SECTION.KEY=VALUE`` items applied (``mindvis demo --set``).

    ``SECTION`` is a step (:data:`SECTIONS`); ``KEY`` is a field of its config, dotted into a nested one
    (``prior.vq.lr``, ``prior.vq_model.n_embed``), or the name of the step command's option for it
    (``train.align-epochs``, ``simulate.rest-subjects``, ``prior.vq-lr``). ``VALUE`` is read as YAML and must have
    the field's type (``true``/``false``, a number, text, ``[a, b]`` for a list); the config then checks it as it
    checks any value. ``null`` restores the field's default (in ``ablation_train``, the ``train`` value applies
    again). ``train`` also sets what the ablations train with, unless ``ablation_train`` sets the same field.
    Fields that the demo sets itself (the prior's resolution, stage B's dataset, what an ablation changes) are
    refused.

    Raises:
        ConfigError: (``field="--set"``) an item is not ``SECTION.KEY=VALUE``, names another section or no field
            of the section's config, or has a value of the wrong type or one the config refuses.
    """
    out = copy.deepcopy(preset)
    for item in items:
        target, sep, raw = item.partition("=")
        section, dot, key = target.strip().partition(".")
        if not sep or not dot or not key.strip():
            raise ConfigError(
                f"expected SECTION.KEY=VALUE (e.g. pretrain.variant=small), got {item!r}", field="--set"
            )
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown section {section!r} in {item!r}; expected one of {', '.join(SECTIONS)}",
                field="--set",
            )
        path = _field_path(section, _section_config(out, section), key)
        value = _parse_value(section, key, raw)
        try:
            _with_change(out, section, path, value)
        except ConfigError as exc:
            if exc.field == "--set":
                raise
            raise ConfigError(f"{section}.{key}: {exc.detail}", field="--set") from None
        out.overrides.append(item)
    return out


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def set_items(preset: DemoPreset) -> list[str]:
    """The ``--set`` items that turn the named preset into ``preset``, written from the configs: applied to
    ``get_preset(preset.name)`` (:func:`apply_overrides`) they give the same configs."""
    base = get_preset(preset.name)
    items = []
    for section in SECTIONS:
        if section == "ablation_train":
            mine, theirs = preset.ablation_train, base.ablation_train
            for k in sorted(set(mine) | set(theirs)):
                if k not in mine:
                    items.append(f"{section}.{k}=null")
                elif theirs.get(k, object()) != mine[k]:
                    items.append(f"{section}.{k}={_yaml_value(config_to_dict(mine[k]))}")
            continue
        new, old = (
            flatten(config_to_dict(getattr(preset, section))),
            flatten(config_to_dict(getattr(base, section))),
        )
        if section == "simulate" and new.get("name") != old.get("name"):
            items.append(f"simulate.name={new['name']}")
            old = flatten(config_to_dict(SynthConfig.preset(new["name"])))
        for path in new:
            if path not in old or new[path] != old[path]:
                items.append(f"{section}.{path}={_yaml_value(new[path])}")
        items += [f"{section}.{path}=null" for path in old if path not in new]
    return items


def reproduce_line(preset: DemoPreset, run_dir: Path) -> str:
    """The ``mindvis demo`` command line that makes ``preset``'s run again, written from its configs."""
    sets = "".join(f" --set {shlex.quote(item)}" for item in set_items(preset))
    ablations = (
        "" if preset.ablations == get_preset(preset.name).ablations else f" --ablations {preset.ablations}"
    )
    return f"mindvis demo --preset {preset.name}{sets}{ablations} --run-dir {shlex.quote(str(run_dir))}"


def write_run_yaml(run_dir: Path, preset: DemoPreset, extra: dict[str, Any] | None = None) -> None:
    overrides = list(preset.overrides)
    info = {"preset": preset.name, "note": preset.note, "settings": preset.to_dict()}
    if overrides:
        info["overrides"] = overrides
    doc = {
        "mindvis_demo": info,
        "reproduce": reproduce_line(preset, run_dir),
        **provenance(),
        **(extra or {}),
    }
    with atomic_write(run_dir / "config.yaml", "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False, width=120)

"""Linear probes (mindvis.eval.probe, `mindvis probe`): readouts find planted information and only that."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mindvis.cli import main
from mindvis.data.dataset import FMRIDataset
from mindvis.data.preprocess import FMRIPreprocessor
from mindvis.eval.probe import probe_level, run_probes, source_name, two_way_pixel_identification
from mindvis.models.mbm import MaskedBrainModel, mbm_tiny

VOXELS = 96
CLASSES = 4
RES = 8


def _planted(n: int, seed: int, informative: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, images and voxels; the voxels are a linear map of class and pixels plus noise when
    ``informative``, else noise alone."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    images = rng.integers(0, 256, size=(n, RES, RES, 3), dtype=np.uint8)
    mix = np.random.default_rng(99)  # the same "brain" for both splits
    w_class = mix.normal(size=(CLASSES, VOXELS))
    w_pix = mix.normal(size=(RES * RES * 3, VOXELS)) / np.sqrt(RES * RES * 3)
    noise = rng.normal(size=(n, VOXELS))
    if not informative:
        return labels, images, noise.astype(np.float32)
    pix = images.reshape(n, -1) / 255.0 - 0.5
    signal = 2.0 * np.eye(CLASSES)[labels] @ w_class + 8.0 * pix @ w_pix
    return labels, images, (signal + noise).astype(np.float32)


def _split(n: int, seed: int, split: str, informative: bool) -> FMRIDataset:
    labels, images, voxels = _planted(n, seed, informative)
    return FMRIDataset(
        voxels=voxels,
        subject="sbj_1",
        split=split,  # type: ignore[arg-type]
        image_ids=np.arange(n),
        images=images,
        labels=labels,
        source=f"mem/{split}",
    )


def test_readouts_find_planted_information_and_not_noise():
    tr, te = _split(240, 0, "train", True), _split(60, 1, "test", True)
    good = probe_level("x", "voxels", tr.voxels, te.voxels, (tr.labels, te.labels), _pixels(tr, te))
    assert good.dims == VOXELS and good.class_chance == pytest.approx(1 / CLASSES)
    assert good.class_accuracy >= 0.9
    assert good.pixel_2way >= 0.75
    tr0, te0 = _split(240, 0, "train", False), _split(60, 1, "test", False)
    bad = probe_level("x", "voxels", tr0.voxels, te0.voxels, (tr0.labels, te0.labels), _pixels(tr0, te0))
    assert bad.class_accuracy < good.class_accuracy - 0.4
    assert abs(bad.pixel_2way - 0.5) < 0.12


def _pixels(tr: FMRIDataset, te: FMRIDataset):
    from mindvis.eval.probe import _pixels as pixels

    return pixels(tr), pixels(te)


def test_token_weighting_readout_finds_a_class_in_one_token_only():
    from mindvis.eval.probe import token_weighting_accuracy

    rng = np.random.default_rng(0)
    n_tr, n_te, length, width = 300, 80, 6, 5
    labels = np.arange(n_tr + n_te) % CLASSES
    tokens = rng.normal(size=(n_tr + n_te, length, width))
    codes = rng.normal(size=(CLASSES, width))
    planted = tokens.copy()
    planted[:, 2] += 2.0 * codes[labels]  # the class lives in token 2 only
    acc = token_weighting_accuracy(planted[:n_tr], planted[n_tr:], labels[:n_tr], labels[n_tr:])
    noise = token_weighting_accuracy(tokens[:n_tr], tokens[n_tr:], labels[:n_tr], labels[n_tr:])
    assert acc >= 0.85 and noise < acc - 0.4
    # a class code that changes sign between two tokens cancels in their mean but not for the weighting
    cancel = tokens.copy()
    cancel[:, 0] += 2.0 * codes[labels]
    cancel[:, 1] -= 2.0 * codes[labels]
    mean_only = cancel.mean(axis=1, keepdims=True)
    assert token_weighting_accuracy(cancel[:n_tr], cancel[n_tr:], labels[:n_tr], labels[n_tr:]) >= 0.85
    assert token_weighting_accuracy(mean_only[:n_tr], mean_only[n_tr:], labels[:n_tr], labels[n_tr:]) < 0.6


def test_two_way_identification_of_perfect_and_reversed_predictions():
    rng = np.random.default_rng(0)
    truth = rng.random((10, 30))
    assert two_way_pixel_identification(truth * 3 + 1, truth) == 1.0
    assert two_way_pixel_identification(-truth, truth) == 0.0


def _stage_a_run(tmp_path, tr: FMRIDataset):
    torch.manual_seed(0)
    run = tmp_path / "stage a2"
    MaskedBrainModel(mbm_tiny(VOXELS)).save_pretrained(run / "model")
    FMRIPreprocessor(patch_size=16, length=VOXELS).fit(tr.voxels).save(run / "preprocessing.json")
    return run


def test_run_probes_levels_of_a_stage_a_run(tmp_path):
    tr, te = _split(120, 0, "train", True), _split(40, 1, "test", True)
    run = _stage_a_run(tmp_path, tr)
    report = run_probes(tr, te, [run / "model"])
    results = report.levels
    assert report.conditioning == {}  # stage A has no denoiser
    assert [(r.source, r.level) for r in results] == [
        ("voxels", "voxels"),
        ("stage a2/model", "input"),
        ("stage a2/model", "tokens"),
        ("stage a2/model", "one token weighting"),
        ("stage a2/model", "mean token"),
    ]
    tokens = results[2]
    cfg = mbm_tiny(VOXELS)
    assert tokens.dims == cfg.num_patches * cfg.embed_dim
    # the preprocessed input is an affine map of the voxels: the same readout
    assert results[1].class_accuracy == pytest.approx(results[0].class_accuracy, abs=0.05)
    assert source_name(run) == "stage a2"


def test_probe_cli_writes_json_table_and_plot(tmp_path, monkeypatch, quiet_cli_logging):
    tr, te = _split(120, 0, "train", True), _split(40, 1, "test", True)
    run = _stage_a_run(tmp_path, tr)

    def fake_load(kind, data_dir, subject, split, **kw):
        return {"train": tr, "test": te}[split]

    monkeypatch.setattr("mindvis.eval.probe.load_dataset", fake_load)
    out = tmp_path / "probe out"
    data_dir = str(tmp_path / "data")  # read through the patched loader
    code = main(["probe", str(run), "--dataset", "synthetic", "--data-dir", data_dir, "--out", str(out)])
    assert code == 0
    data = json.loads((out / "probe.json").read_text())
    assert data["format"] == "mindvis-probe/1" and len(data["results"]) == 5
    assert data["data"]["train"] == 120 and data["data"]["test"] == 40
    assert (out / "probe.md").read_text().count("\n") == 2 + 5
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing non-empty folder is not replaced without --overwrite
    again = main(["probe", "--dataset", "synthetic", "--data-dir", data_dir, "--out", str(out)])
    assert again == 2 and len(json.loads((out / "probe.json").read_text())["results"]) == 5


def test_probe_needs_labels_or_images():
    from mindvis.errors import DataError

    tr = FMRIDataset(voxels=np.zeros((4, VOXELS), np.float32), subject="s", split="train", source="a")
    te = FMRIDataset(voxels=np.zeros((2, VOXELS), np.float32), subject="s", split="test", source="b")
    with pytest.raises(DataError, match="labels or paired images"):
        run_probes(tr, te, [])


def test_conditioning_use_sees_whether_the_denoiser_reads_the_fmri():
    from mindvis.eval.probe import conditioning_use
    from mindvis.models.ldm import DCLDM, ldm_preset
    from mindvis.models.mbm import FMRIEncoder

    torch.manual_seed(0)
    model = DCLDM.for_fmri(ldm_preset("tiny"), FMRIEncoder(mbm_tiny(VOXELS))).eval()
    n = 6
    images = np.random.default_rng(0).integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)
    voxels = np.random.default_rng(1).normal(size=(n, VOXELS)).astype(np.float32)
    use = conditioning_use(model, voxels, images, draws=2)
    assert use["loss_true"] > 0 and np.isfinite(use["gap_percent"])
    # identical fMRI for every sample: shuffling changes nothing
    same = conditioning_use(model, np.repeat(voxels[:1], n, axis=0), images, draws=2)
    assert same["gap_percent"] == pytest.approx(0.0, abs=1e-9)
    # a model that ignores the context and the time vector: zero cross-attention output projections
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "attn2.to_out" in name:
                p.zero_()
        model.conditioner.time_mapper[-1].weight.zero_()
    blind = conditioning_use(model, voxels, images, draws=2)
    assert blind["gap_percent"] == pytest.approx(0.0, abs=1e-6)
    assert use["loss_shuffled"] != pytest.approx(use["loss_true"], rel=1e-9)


def test_prior_class_signal_measures_how_the_loss_names_the_class():
    from mindvis.errors import ConfigError, DataError
    from mindvis.eval.probe import prior_class_signal
    from mindvis.train.prior import PriorTrainConfig, build_class_prior

    torch.manual_seed(0)
    k, n, draws = 3, 9, 5
    prior = build_class_prior(PriorTrainConfig(preset="tiny", resolution=32).ldm_config(k), k).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % k
    plain = prior_class_signal(prior, images, labels, draws=draws)
    assert plain["items"] == n and plain["chance"] == pytest.approx(1 / k)
    assert set(plain["accuracy"]) == {1, 4, draws} and 0 <= plain["pairwise_win"] <= 1
    assert np.isfinite(plain["gap_percent"]) and plain["loss_own"] > 0

    table = prior.conditioner.embedding.weight[:-1].detach()
    truth = torch.as_tensor(labels)

    def rigged(x0):
        """A denoiser that predicts the noise exactly under the image's own class, and zero otherwise."""

        def eps(x_t, t, cond):
            a = prior.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
            s = prior.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
            own = torch.isclose(cond.context[:, 0], table[truth]).all(dim=1)
            return torch.where(own[:, None, None, None], (x_t - a * x0) / s, torch.zeros_like(x_t))

        return eps

    from mindvis.data.paired import images_to_tensor

    with torch.no_grad():
        x0 = prior.encode_images(images_to_tensor(images))
    prior.eps = rigged(x0)
    sharp = prior_class_signal(prior, images, labels, draws=draws)
    assert all(v == 1.0 for v in sharp["accuracy"].values()) and sharp["pairwise_win"] == 1.0
    by_t = sharp["pairwise_win_by_timestep"]
    assert by_t and all(v == 1.0 for v in by_t.values())
    assert set(by_t) <= {"0-250", "250-500", "500-750", "750-1000"}
    assert sharp["loss_own"] == pytest.approx(0.0, abs=1e-4) and sharp["loss_other"] > 0.5
    # a denoiser blind to the class: no gap, and the own class never strictly wins
    prior.eps = lambda x_t, t, cond: torch.zeros_like(x_t)
    blind = prior_class_signal(prior, images, labels, draws=draws)
    assert blind["gap_percent"] == pytest.approx(0.0, abs=1e-9) and blind["pairwise_win"] == 0.0
    assert all(v == 0.0 for v in blind["pairwise_win_by_timestep"].values())
    del prior.eps

    with pytest.raises(DataError, match="class label"):
        prior_class_signal(prior, images, labels + k, draws=1)
    from mindvis.models.ldm import DCLDM, ldm_preset
    from mindvis.models.mbm import FMRIEncoder

    fmri_model = DCLDM.for_fmri(ldm_preset("tiny"), FMRIEncoder(mbm_tiny(VOXELS)))
    with pytest.raises(ConfigError, match="class signal"):
        prior_class_signal(fmri_model, images, labels, draws=1)


def test_probe_cli_reports_the_prior_class_signal(tmp_path, monkeypatch, quiet_cli_logging):
    from mindvis.train.prior import PriorTrainConfig, build_class_prior, save_prior_pipeline

    torch.manual_seed(0)
    prior = tmp_path / "prior"
    ldm = PriorTrainConfig(preset="tiny", resolution=32).ldm_config(CLASSES)
    save_prior_pipeline(build_class_prior(ldm, CLASSES), prior, [f"c{i}" for i in range(CLASSES)])
    tr, te = _split(24, 0, "train", True), _split(8, 1, "test", True)
    unlabelled = FMRIDataset(voxels=tr.voxels, subject="sbj_1", split="train", source="mem/train")
    splits = {"train": tr, "test": te}
    monkeypatch.setattr("mindvis.eval.probe.load_dataset", lambda kind, d, subj, split, **kw: splits[split])
    out = tmp_path / "probe"
    args = ["probe", "--dataset", "synthetic", "--data-dir", str(tmp_path / "data"), "--prior", str(prior)]
    assert main([*args, "--prior-items", "6", "--prior-draws", "2", "--out", str(out)]) == 0
    signal = json.loads((out / "probe.json").read_text())["prior_class_signal"]
    assert signal["items"] == 6 and signal["draws"] == 2 and set(signal["accuracy"]) == {"1", "2"}
    assert signal["chance"] == pytest.approx(1 / CLASSES) and signal["prior"] == str(prior)
    assert "0.5: no signal" in (out / "probe.md").read_text()
    splits["train"] = unlabelled
    assert main(args) != 0  # no labels: a one-line error before any probing


def test_probe_writes_what_it_returns(tmp_path, monkeypatch):
    from mindvis.errors import OutputExistsError, OutputOverlapError
    from mindvis.eval.config import ProbeConfig
    from mindvis.eval.probe import PROBE_FORMAT, probe

    tr, te = _split(120, 0, "train", True), _split(40, 1, "test", True)
    run_dir = _stage_a_run(tmp_path, tr)
    asked = []

    def fake_load(kind, data_dir, subject, split, **kw):
        asked.append((kind, data_dir, subject, split, kw))
        return {"train": tr, "test": te}[split]

    monkeypatch.setattr("mindvis.eval.probe.load_dataset", fake_load)
    data_dir = tmp_path / "data"
    printed = probe(
        ProbeConfig(), [run_dir / "model"], None, dataset="synthetic", data_dir=data_dir, roi="V1"
    )
    assert printed.out is None and printed.prior_signal is None and not list(tmp_path.glob("*probe*"))
    assert asked == [
        ("synthetic", data_dir, None, "train", {"roi": "V1"}),
        ("synthetic", data_dir, "sbj_1", "test", {"roi": "V1"}),
    ]
    out = tmp_path / "probe out"
    run = probe(ProbeConfig(), [run_dir / "model"], out, dataset="synthetic", data_dir=data_dir)
    assert run.data == {
        "dataset": "synthetic",
        "data_dir": str(data_dir),
        "subject": "sbj_1",
        "train": 120,
        "test": 40,
    }
    assert [r["level"] for r in run.rows] == [
        "voxels",
        "input",
        "tokens",
        "one token weighting",
        "mean token",
    ]
    assert run.rows == printed.rows  # the probes are deterministic
    saved = json.loads((out / "probe.json").read_text())
    assert saved["format"] == PROBE_FORMAT and saved["data"] == run.data
    assert saved["results"] == json.loads(json.dumps(run.rows)) and saved["conditioning_use"] == {}
    assert "prior_class_signal" not in saved and "versions" in saved
    table = (out / "probe.md").read_text().splitlines()
    assert len(table) == 2 + 5 and table[2].startswith("| voxels | voxels | 96 |")
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["probe.json", "probe.md", "probe.png"]
    with pytest.raises(OutputExistsError):
        probe(ProbeConfig(), [], out, dataset="synthetic", data_dir=data_dir)
    with pytest.raises(OutputOverlapError, match="MODELS"):
        probe(
            ProbeConfig(),
            [run_dir / "model"],
            run_dir / "model" / "probe",
            dataset="synthetic",
            data_dir=data_dir,
        )
    again = probe(ProbeConfig(), [], out, dataset="synthetic", data_dir=data_dir, overwrite=True)
    assert len(again.rows) == 1 and len(json.loads((out / "probe.json").read_text())["results"]) == 1

"""SynthCortex: the simulator's science (retinotopy, noise, resting-state structure, calibration) and its files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mindvis import synthcortex as syn
from mindvis.errors import ConfigError, OutputExistsError
from mindvis.synthcortex import sources
from mindvis.utils.io import file_sha256

#: a tiny experiment: every count is an option, so tests run in seconds
SMALL = {
    "voxels": 800,
    "rest_vertices": 500,
    "n_train": 80,
    "n_test": 10,
    "n_repeats": 5,
    "n_trs": 200,
    "corpus_size": 30,
    "n_rest_subjects": 2,
    "resolution": 32,
    "calibration_images": 24,
    "calibration_repeats": 4,
    "calibration_voxels": 150,
}


@pytest.fixture(scope="module", autouse=True)
def stimulus_source(tmp_path_factory):
    """Use the installed Fashion-MNIST; where it is missing, a Fashion-MNIST-format stand-in."""
    with pytest.MonkeyPatch.context() as mp:
        if not (
            sources._idx_files(sources.FASHION_MNIST_SYSTEM_DIR, "train")
            and sources._idx_files(sources.FASHION_MNIST_SYSTEM_DIR, "test")
        ):
            from test_stimuli import write_fake_fashion_mnist

            folder = write_fake_fashion_mnist(tmp_path_factory.mktemp("fmnist"), 1500, 400)
            mp.setenv("MINDVIS_FASHION_MNIST", str(folder))
        yield


@pytest.fixture(scope="module")
def small_run():
    """One target subject of a small experiment, kept in memory: (config, plan, run)."""
    cfg = syn.SynthConfig.preset(
        "realistic",
        **{
            **SMALL,
            "voxels": 1200,
            "n_train": 150,
            "n_test": 12,
            "n_repeats": 35,
            "n_rest_subjects": 0,
            "corpus_size": 0,
        },
    )
    plan = syn.make_stimuli(cfg, corpus=False)
    fm_train = syn.feature_maps(plan.train.images, cfg.field_deg, cfg.seed)
    fm_test = syn.feature_maps(plan.test.images, cfg.field_deg, cfg.seed)
    return cfg, plan, syn.run_god_subject(cfg, 1, plan, fm_train, fm_test)


# ---- configuration ------------------------------------------------------------------------------------


def test_presets_and_validation():
    real = syn.SynthConfig.preset()
    assert real == syn.SynthConfig() and real.name == "realistic"
    easy, hard = syn.SynthConfig.preset("easy"), syn.SynthConfig.preset("hard")
    assert easy.snr_median > real.snr_median > hard.snr_median
    with pytest.raises(ConfigError, match="unknown preset 'noisy'"):
        syn.SynthConfig.preset("noisy")
    with pytest.raises(ConfigError, match="impossible voxel count") as info:
        syn.SynthConfig.preset(voxels=50)
    assert info.value.field == "voxels"
    with pytest.raises(ConfigError, match="unknown option"):
        syn.SynthConfig.preset(n_voxelz=4)
    with pytest.raises(ConfigError, match="n_repeats"):
        syn.SynthConfig.preset(n_repeats=1)
    with pytest.raises(ConfigError, match="source"):
        syn.SynthConfig.preset(source="mnist-digits")


def test_derived_values_follow_overrides():
    cfg = syn.SynthConfig.preset("hard", voxels=1000, rest_vertices=740)
    assert abs(sum(cfg.roi_voxels.values()) - 1000) <= 2
    assert abs(sum(cfg.rest_roi_vertices.values()) - 740) <= 2
    again = syn.SynthConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


# ---- anatomy ------------------------------------------------------------------------------------------


def test_retinotopic_map():
    cfg = syn.SynthConfig.preset(voxels=3000)
    s = syn.sample_subject(cfg, 1)
    ecc = np.hypot(s.x, s.y)
    med = {}
    for r in syn.RETINOTOPIC:
        m = s.mask(r)
        slope = np.polyfit(ecc[m], s.sigma[m], 1)[0]
        assert slope > 0.05, f"{r}: pRF size must grow with eccentricity"
        band = m & (ecc > 2) & (ecc < 4)
        med[r] = np.median(s.sigma[band])
        # the left hemisphere maps the right visual field and vice versa
        assert np.mean(s.x[m & (s.hemi == 0)] > 0) > 0.85
        assert np.mean(s.x[m & (s.hemi == 1)] < 0) > 0.85
        assert ecc[m].min() < 0.6 and np.quantile(ecc[m], 0.95) > 4.5  # fovea to periphery
    assert med["V1"] < med["V2"] < med["V3"] < med["V4"], med
    hvc = s.mask("HVC")
    assert np.median(s.sigma[hvc]) > 1.5 * med["V4"] and np.median(ecc[hvc]) < 2.5
    # V2 has a dorsal (lower field) and a ventral (upper field) quarter-field map in each hemisphere
    v2l = np.flatnonzero(s.mask("V2") & (s.hemi == 0))
    half = len(v2l) // 2
    assert np.mean(s.y[v2l[:half]] < 0.3) > 0.85 and np.mean(s.y[v2l[half:]] > -0.3) > 0.85
    # subjects differ in voxel counts
    counts = [syn.sample_subject(cfg, k).num_voxels for k in (1, 2, 3)]
    assert len(set(counts)) == 3 and all(abs(c - 3000) < 400 for c in counts)


def test_voxel_order_is_cortically_coherent():
    s = syn.sample_subject(syn.SynthConfig.preset(), 1)
    same = s.roi[1:] == s.roi[:-1]
    step = np.hypot(np.diff(s.x), np.diff(s.y))[same]
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, s.num_voxels, (2, 20000))
    rand = np.hypot(s.x[i] - s.x[j], s.y[i] - s.y[j])
    assert np.median(step) < 0.3 * np.median(rand)
    # 16-voxel patches of the retinotopic ROIs cover a small part of the visual field
    n16 = (s.mask("V1").sum() // 16) * 16
    px, py = s.x[:n16].reshape(-1, 16), s.y[:n16].reshape(-1, 16)
    spread = np.hypot(px - px.mean(axis=1, keepdims=True), py - py.mean(axis=1, keepdims=True)).mean(axis=1)
    assert np.median(spread) < 0.4 * np.median(rand)


# ---- responses and noise ------------------------------------------------------------------------------


def _bars(res: int = 64, npos: int = 16, width: int = 6, textures: int = 3):
    """Vertical and horizontal bars of colour noise on grey (a pRF-mapping stimulus)."""
    rng = np.random.default_rng(1)
    imgs, axis, centre = [], [], []
    for _ in range(textures):
        for a in (0, 1):
            for i in range(npos):
                img = np.full((res, res, 3), 128, np.uint8)
                lo = int(round(i * res / npos))
                hi = min(res, lo + width)
                tex = rng.integers(0, 256, (res, res, 3)).astype(np.uint8)
                if a == 0:
                    img[:, lo:hi] = tex[:, lo:hi]
                else:
                    img[lo:hi, :] = tex[lo:hi, :]
                c = (lo + hi) / 2 / res * 12 - 6
                imgs.append(img)
                axis.append(a)
                centre.append(c if a == 0 else -c)
    return np.array(imgs), np.array(axis), np.array(centre)


def test_rf_centres_recoverable_from_localized_stimuli(small_run):
    cfg, plan, run = small_run
    subj = run.subject
    imgs, axis, centre = _bars()
    sig, _ = subj.responses(syn.feature_maps(imgs, cfg.field_deg, cfg.seed))
    n, reps, npos = len(imgs), 40, 16
    rng = np.random.default_rng(5)
    noise = subj.trial_noise(np.repeat(np.arange(reps), n), np.zeros(reps * n, np.float32), rng)
    measured = (subj.baseline[None] + sig[None] + noise.reshape(reps, n, -1)).mean(axis=0)
    est = []
    for a in (0, 1):
        profile = measured[axis == a].reshape(-1, npos, subj.num_voxels).mean(axis=0)  # [npos, V]
        w = np.maximum(profile - np.median(profile, axis=0), 0) ** 2
        est.append((w * centre[axis == a][:npos, None]).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-12))
    ecc = np.hypot(subj.x, subj.y)
    early = subj.mask("V1") | subj.mask("V2") | subj.mask("V3")
    good = early & (ecc < 5) & (run.true_snr > np.median(run.true_snr))
    err = np.hypot(est[0][good] - subj.x[good], est[1][good] - subj.y[good])
    assert good.sum() > 100
    assert np.median(err) < 0.8
    assert np.corrcoef(est[0][good], subj.x[good])[0, 1] > 0.6
    assert np.corrcoef(est[1][good], subj.y[good])[0, 1] > 0.5
    # without noise the centres are recovered almost exactly
    w = [
        np.maximum(p - np.median(p, axis=0), 0) ** 2
        for p in (sig[axis == a].reshape(-1, npos, subj.num_voxels).mean(axis=0) for a in (0, 1))
    ]
    ex = [
        (wi * centre[axis == a][:npos, None]).sum(axis=0) / np.maximum(wi.sum(axis=0), 1e-12)
        for a, wi in enumerate(w)
    ]
    assert np.median(np.hypot(ex[0][good] - subj.x[good], ex[1][good] - subj.y[good])) < 0.4


def test_averaging_reduces_noise_by_sqrt_repeats(small_run):
    cfg, _, run = small_run
    base = run.subject.baseline[None]
    single = run.test_trials - base - run.test_signal[run.test_index]
    avg = run.test_avg - base - run.test_signal
    ratio = single.std() / avg.std()
    assert abs(ratio / np.sqrt(cfg.n_repeats) - 1) < 0.15, ratio
    # and the averaged data have a higher SNR than single trials, by about the same factor
    snr_single = run.test_signal.std(axis=0) / single.std(axis=0)
    snr_avg = run.test_signal.std(axis=0) / avg.std(axis=0)
    assert abs(np.median(snr_avg / snr_single) / np.sqrt(cfg.n_repeats) - 1) < 0.2
    # arr_2 is the mean of each image's arr_1 rows
    grouped = run.test_trials.reshape(cfg.n_test, cfg.n_repeats, -1).mean(axis=1)
    np.testing.assert_allclose(grouped, run.test_avg, atol=1e-5)
    assert (run.test_index == np.repeat(np.arange(cfg.n_test), cfg.n_repeats)).all()


def test_noise_is_spatially_correlated_along_the_cortical_order(small_run):
    _, _, run = small_run
    resid = run.test_trials - run.test_avg[run.test_index]
    resid = resid / resid.std(axis=0)
    lag1 = np.mean(resid[:, 1:] * resid[:, :-1])
    far = np.mean(resid[:, 200:] * resid[:, :-200])
    assert lag1 > 0.2 and lag1 > far + 0.15


def test_snr_heavy_tailed_and_noise_ceiling_estimates_track_truth(small_run):
    _, _, run = small_run
    snr = run.true_snr
    assert np.quantile(snr, 0.9) > 2.5 * np.median(snr)  # heavy right tail
    assert np.mean(snr < 0.5 * np.median(snr)) > 0.15  # many nearly uninformative voxels
    assert np.corrcoef(run.nc, run.true_nc)[0, 1] > 0.7
    assert np.corrcoef(run.ncsnr, run.true_snr)[0, 1] > 0.8
    assert run.nc.min() >= 0 and run.nc.max() <= 1


def test_hvc_is_category_selective_and_early_areas_are_not(small_run):
    cfg, plan, run = small_run
    labels = plan.train.labels[run.train_index]
    pred = run.train_pred

    def eta2(x):  # share of each voxel's variance explained by the stimulus class, median over voxels
        means = np.stack([x[labels == c].mean(axis=0) for c in range(10)])
        between = ((means[labels] - x.mean(axis=0)) ** 2).sum(axis=0)
        return np.median(between / ((x - x.mean(axis=0)) ** 2).sum(axis=0))

    hvc, v1 = run.subject.mask("HVC"), run.subject.mask("V1")
    assert eta2(pred[:, hvc]) > 0.5
    assert eta2(pred[:, hvc]) > 2 * eta2(pred[:, v1])
    # tuning is sparse: most HVC voxels prefer one class strongly
    cw = run.subject.category_w[hvc]
    assert np.median(cw.max(axis=1)) > 0.5


def test_resting_state_network_structure():
    cfg = syn.SynthConfig.preset(rest_vertices=600, n_trs=600)
    s = syn.sample_subject(cfg, 1, "rest")
    ts = syn.rest_timeseries(cfg, s, np.random.default_rng(0))
    assert ts.shape == (600, s.num_voxels) and ts.dtype == np.float32
    c = np.corrcoef(ts.T)
    net = s.network
    same = net[:, None] == net[None]
    off = ~np.eye(len(net), dtype=bool)
    within, across = c[same & off].mean(), c[~same].mean()
    assert within > across + 0.15, (within, across)
    # retinotopic spontaneous patterns: voxels with nearby pRFs correlate more
    d = np.hypot(s.x[:, None] - s.x[None], s.y[:, None] - s.y[None])
    assert c[(d < 1) & off].mean() > c[d > 6].mean() + 0.2
    # HRF smoothing: slow fluctuations, high lag-1 autocorrelation
    z = (ts - ts.mean(axis=0)) / ts.std(axis=0)
    assert np.mean(z[1:] * z[:-1]) > 0.4
    # deterministic in the generator
    np.testing.assert_array_equal(ts, syn.rest_timeseries(cfg, s, np.random.default_rng(0)))


# ---- files ---------------------------------------------------------------------------------------------


def _small_config(**over):
    return syn.SynthConfig.preset("realistic", **{**SMALL, **over})


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("sc") / "out"
    man = syn.simulate(_small_config(), out)
    return out, man


def test_output_layout(small_folder):
    out, man = small_folder
    cfg = _small_config()
    assert json.loads((out / "synthcortex.json").read_text())["config"]["seed"] == 0
    with np.load(out / "GOD" / "sbj_1.npz") as z:
        v = z["arr_0"].shape[1]
        assert z["arr_0"].shape == (cfg.n_train, v) and z["arr_0"].dtype == np.float32
        assert z["arr_1"].shape == (cfg.n_test * cfg.n_repeats, v) and z["arr_2"].shape == (cfg.n_test, v)
        assert sorted(z["arr_3"].tolist()) == list(range(cfg.n_train)) and z["arr_3"].dtype == np.int64
        assert z["arr_4"].shape == (cfg.n_test * cfg.n_repeats,)
        assert z["arr_5"].shape == (v,) and z["arr_6"].shape == (v,)
        masks = {r: z[r] for r in (*syn.ROIS, "VC")}
        assert all(m.dtype == bool and m.shape == (v,) for m in masks.values())
        assert masks["VC"].all() and sum(masks[r].sum() for r in syn.ROIS) == v
        assert man["subjects"]["sbj_1"]["voxels"] == v
        assert len(man["subjects"]["sbj_1"]["voxel"]["x_deg"]) == v
    with np.load(out / "GOD" / f"images_{cfg.resolution}.npz") as z:
        assert z["train_images"].shape == (cfg.n_train, 32, 32, 3) and z["train_images"].dtype == np.uint8
        assert z["test_images"].shape == (cfg.n_test, 32, 32, 3)
        assert z["train_labels"].dtype == np.int64 and z["test_labels"].shape == (cfg.n_test,)
        train_labels, test_labels = z["train_labels"], z["test_labels"]
    # class index and label tables as the original GOD distribution: label <category>.<image>, file name
    index = json.loads((out / "GOD" / "imagenet_class_index.json").read_text())
    wnid_to_class = {int(v[0][1:]): int(k) for k, v in index.items()}
    assert len(index) == 10 and index["0"][1] == man["class_names"][0]
    for split, labels in (("training", train_labels), ("testing", test_labels)):
        with open(out / "GOD" / f"imagenet_{split}_label.csv", newline="") as fh:
            rows = list(csv.reader(fh))
        assert len(rows) == len(labels)
        assert [wnid_to_class[int(r[0].split(".")[0])] for r in rows] == labels.tolist()
        assert all(r[1].startswith("n") and r[1].endswith(".png") for r in rows)
    # HCP: V1..V4, n_trs x vertices each, the same vertex counts for every subject
    subjects = sorted(p.name for p in (out / "HCP" / "npz").iterdir())
    assert subjects == ["rest_001", "rest_002"]
    shapes = []
    for sub in subjects:
        with np.load(out / "HCP" / "npz" / sub / "HCP_visual_voxel.npz") as z:
            assert sorted(z.files) == ["V1", "V2", "V3", "V4"]
            assert all(z[r].dtype == np.float32 and z[r].shape[0] == cfg.n_trs for r in z.files)
            shapes.append([z[r].shape[1] for r in syn.RETINOTOPIC])
    assert shapes[0] == shapes[1] and abs(sum(shapes[0]) - cfg.rest_vertices) <= 2
    with np.load(out / "stimuli" / "corpus.npz") as z:
        assert z["images"].shape == (cfg.corpus_size, 32, 32, 3) and z["labels"].shape == (cfg.corpus_size,)
        assert list(z["class_names"]) == man["class_names"]
    # files are readable by everyone the umask allows, like ordinary files
    assert (out / "GOD" / "sbj_1.npz").stat().st_mode & 0o044


def test_corpus_has_no_test_objects():
    cfg = _small_config(corpus_size=200)
    plan = syn.make_stimuli(cfg)
    train_bank = sources.load_objects(cfg.source, "train")
    test_bank = sources.load_objects(cfg.source, "test")
    # the corpus and the GOD training images come from the source's train split, disjoint objects;
    # the GOD test images from its test split
    assert len(np.intersect1d(plan.corpus.object_index, plan.train.object_index)) == 0
    assert plan.corpus.object_index.max() < len(train_bank) and plan.test.object_index.max() < len(test_bank)
    corpus_objects = train_bank.images[plan.corpus.object_index].reshape(len(plan.corpus), -1)
    test_objects = test_bank.images[plan.test.object_index].reshape(len(plan.test), -1)
    same = (corpus_objects[:, None, :] == test_objects[None, :, :]).all(axis=2)
    assert not same.any()


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_identical_files_different_seed_differs(small_folder, tmp_path):
    out, _ = small_folder
    again = tmp_path / "again"
    syn.simulate(_small_config(), again, workers=1)
    assert _digests(out) == _digests(again)
    other = tmp_path / "other"
    syn.simulate(_small_config(seed=1), other)
    a, b = _digests(out), _digests(other)
    assert a.keys() == b.keys()
    for name in (
        "GOD/sbj_1.npz",
        "GOD/images_32.npz",
        "HCP/npz/rest_001/HCP_visual_voxel.npz",
        "stimuli/corpus.npz",
    ):
        assert a[name] != b[name], name


def test_existing_output_and_failures_leave_no_partial_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        syn.simulate(_small_config(n_rest_subjects=0), out)
    assert (out / "keep.txt").read_text() == "x"

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    fresh = tmp_path / "fresh"
    monkeypatch.setattr("mindvis.synthcortex.run._write_rest_subject", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        syn.simulate(_small_config(), fresh)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    monkeypatch.undo()
    syn.simulate(_small_config(n_rest_subjects=0, corpus_size=0), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "GOD" / "sbj_1.npz").is_file()
    assert not (out / "HCP").exists() and not (out / "stimuli").exists()


# ---- calibration --------------------------------------------------------------------------------------

#: documented range of the default preset (docs/synthcortex.md): Kay et al. 2008 report 92 % / 72 %
#: (averaged) and 51 % / 32 % (single trial) for their two subjects.
KAY_AVERAGED = (0.6, 0.97)
KAY_SINGLE = (0.2, 0.6)


def test_calibration_default_preset_reduced(tmp_path):
    """The default preset at full voxel count, with fewer training trials and no resting state."""
    cfg = syn.SynthConfig.preset("realistic", n_train=300, n_rest_subjects=0, corpus_size=0)
    man = syn.simulate(cfg, tmp_path / "cal", report=True)
    ident = man["calibration"]["identification_true_model"]
    assert KAY_AVERAGED[0] <= ident["averaged"] <= KAY_AVERAGED[1], ident
    assert KAY_SINGLE[0] <= ident["single_trial"] <= KAY_SINGLE[1], ident
    assert ident["averaged"] > ident["single_trial"] + 0.2
    ridge = man["calibration"]["ridge_decoder"]
    assert ridge["class_accuracy"] > 3 * ridge["class_chance"]
    nc = man["calibration"]["noise_ceiling"]["estimated_from_test_repeats"]["VC"]
    assert 0.05 < nc["median"] < 0.6
    saved = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert saved["identification_true_model"]["averaged"] == ident["averaged"]


def test_calibration_report_from_folder_reproduces(small_folder):
    out, _ = small_folder
    cal = syn.calibration_report(out, write=False)
    again = syn.calibration_report(out, write=False)
    assert cal == again
    assert set(cal) >= {"noise_ceiling", "identification_true_model", "ridge_decoder"}
    assert cal["identification_true_model"]["n_images"] == SMALL["calibration_images"]


@pytest.mark.slow
def test_calibration_default_preset_full(tmp_path):
    """The full default experiment (1200 training trials, 50 x 35 test trials; resting state left out)."""
    cfg = syn.SynthConfig.preset("realistic", n_rest_subjects=0, corpus_size=0)
    cal = syn.simulate(cfg, tmp_path / "full", report=True)["calibration"]
    ident = cal["identification_true_model"]
    assert KAY_AVERAGED[0] <= ident["averaged"] <= KAY_AVERAGED[1], ident
    assert KAY_SINGLE[0] <= ident["single_trial"] <= KAY_SINGLE[1], ident
    ridge = cal["ridge_decoder"]
    assert ridge["identification"] > 2 * ridge["identification_chance"]
    assert ridge["class_accuracy"] > 5 * ridge["class_chance"]
    assert cal["identification_true_model_god_test"]["accuracy"] > 0.5

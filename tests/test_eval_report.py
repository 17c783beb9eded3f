"""The evaluation suite end to end, the HTML/JSON report, the commands, and the report in headless Chromium."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from mindvis.commands import evaluate as evaluate_cmd
from mindvis.commands import train_classifier as train_cmd
from mindvis.eval.classifier import ClassifierOutput
from mindvis.eval.report import load_results, summary_table, write_report
from mindvis.eval.suite import evaluate_reconstructions, metric_rows


class StubClassifier:
    """Class = brightest colour channel (3 classes), features = channel means."""

    name = "stub"
    class_names = ["red", "green", "blue"]

    def predict(self, images, batch_size=64):
        means = images.reshape(len(images), -1, 3).mean(axis=1) / 255.0
        logits = 20.0 * means
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return ClassifierOutput(p / p.sum(axis=1, keepdims=True), means)

    def describe(self):
        return {"name": self.name, "kind": "stub", "num_classes": 3}


def _images(n=8, s=2, size=24, seed=0):
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 120, (n, size, size, 3), dtype=np.uint8)
    gt[np.arange(n), :, :, np.arange(n) % 3] += 120  # a dominant channel per image
    rec = np.clip(gt[:, None].astype(int) + rng.integers(-15, 16, (n, s, size, size, 3)), 0, 255).astype(
        np.uint8
    )
    return rec, gt


def _small(**kw):
    return dict(bootstrap=50, trials=50, n_way=(2, 3, 50), **kw)


def test_suite_without_weights_completes_and_labels_what_is_missing():
    rec, gt = _images()
    res = evaluate_reconstructions(
        rec, gt, classifier=StubClassifier(), gt_labels=np.arange(8) % 3, **_small()
    )
    keys = {e["key"] for e in res["metrics"]}
    assert {
        "pixel_ssim",
        "ident_pcc_2way",
        "ident_ssim_3way",
        "semantic_2way_top1",
        "semantic_3way_top1",
        "ident_clf_features_2way",
        "nsd_pixcorr",
        "nsd_ssim",
    } <= keys
    missing = {u["key"]: u["reason"] for u in res["unavailable"]}
    for key in (
        "fid_64",
        "fid_2048",
        "lpips",
        "nsd_alexnet2",
        "nsd_alexnet5",
        "nsd_inception",
        "nsd_effnet",
        "nsd_swav",
        "nsd_clip",
    ):
        assert missing[key].startswith("no weights"), key
    assert "50-way needs at least 50 classes but the classifier has 3" in missing["semantic_50way_top1"]
    assert "needs at least 50 test images" in missing["ident_pcc_50way"]
    assert res["classifier"]["accuracy_on_ground_truth"] == 1.0
    sem = next(e for e in res["metrics"] if e["key"] == "semantic_3way_top1")
    assert sem["chance"] == pytest.approx(1 / 3)
    assert set(sem["aggregates"]) == {"mean", "best_slot", "best_per_image"}
    for e in res["metrics"]:
        for agg in e["aggregates"].values():
            lo, hi = agg["ci95"]
            assert lo - 1e-12 <= agg["value"] <= hi + 1e-12
    rows = metric_rows(res)
    assert all(r["value"] is None for r in rows if r["status"] == "unavailable")
    json.dumps(res)  # JSON-able


def test_suite_is_deterministic_given_seed():
    rec, gt = _images()
    groups = ["pixel", "identification", "semantic", "fid"]
    a = evaluate_reconstructions(rec, gt, classifier=StubClassifier(), seed=3, metrics=groups, **_small())
    b = evaluate_reconstructions(rec, gt, classifier=StubClassifier(), seed=3, metrics=groups, **_small())
    strip = lambda r: [(e["key"], e["aggregates"], e["per_image"]) for e in r["metrics"]]  # noqa: E731
    assert strip(a) == strip(b)


def test_perfect_versus_random_reconstructions():
    rec, gt = _images(n=10)
    rng = np.random.default_rng(9)
    groups = ["pixel", "identification", "semantic"]
    perfect = evaluate_reconstructions(
        gt[:, None], gt, classifier=StubClassifier(), metrics=groups, **_small()
    )
    rand = evaluate_reconstructions(
        rng.integers(0, 256, rec.shape, dtype=np.uint8),
        gt,
        classifier=StubClassifier(),
        metrics=groups,
        **_small(),
    )
    val = lambda r, k: next(e for e in r["metrics"] if e["key"] == k)["aggregates"]["mean"]  # noqa: E731
    for key in ("semantic_3way_top1", "ident_pcc_2way", "ident_ssim_2way", "ident_mse_2way"):
        assert val(perfect, key)["value"] == pytest.approx(1.0)
    lo, hi = val(rand, "ident_pcc_2way")["ci95"]
    assert lo <= 0.5 <= hi


def test_true_and_original_uint8_mse_are_reported_apart(tmp_path):
    rec, gt = _images(n=5, s=2)
    res = evaluate_reconstructions(rec, gt, metrics=["pixel", "identification"], **_small())
    by_key = {e["key"]: e for e in res["metrics"]}
    # the true MSE keeps its keys and values, under a label that no longer claims to be the original's
    mse = by_key["pixel_mse"]
    assert mse["label"] == "MSE ([0, 1] floats)"
    want = np.mean([[np.mean((rec[i, k] / 255.0 - gt[i] / 255.0) ** 2) for k in range(2)] for i in range(5)])
    assert mse["aggregates"]["mean"]["value"] == pytest.approx(want, abs=1e-12)
    assert "not the MinD-Vis published 'pairwise MSE'" in by_key["ident_mse_2way"]["definition"]
    # the original's uint8 MSE, wrapping modulo 256, under its own keys
    orig = by_key["pixel_mse_uint8_original"]
    assert "wraps mod 256" in orig["label"] and "only for comparison with published numbers" in orig["label"]
    assert orig["higher_is_better"] is False
    want = np.mean([[np.square(rec[i, k] - gt[i]).mean() for k in range(2)] for i in range(5)])
    assert orig["aggregates"]["mean"]["value"] == pytest.approx(want, abs=1e-12)
    ident = by_key["ident_mse_uint8_original_2way"]
    assert (
        "wrapping mod 256" in ident["label"] and "MinD-Vis 'pairwise MSE' as published" in ident["definition"]
    )
    assert ident["higher_is_better"] is True and ident["chance"] == 0.5
    assert "ident_mse_uint8_original_3way" in by_key
    assert any("uint8-wrapped MSE is computed here at 24x24" in n for n in res["notes"])
    written = write_report(res, tmp_path / "rep")
    assert {e["key"] for e in load_results(tmp_path / "rep")["metrics"]} >= {
        "pixel_mse",
        "ident_mse_2way",
        "pixel_mse_uint8_original",
        "ident_mse_uint8_original_2way",
    }
    page = written["html"].read_text()
    assert "MSE uint8, wraps mod 256 (MinD-Vis original; only for comparison with published numbers)" in page
    assert "MSE ([0, 1] floats)" in page
    console = Console(record=True, width=400, file=io.StringIO())
    console.print(summary_table(res))
    assert "MSE uint8, wraps mod 256 (MinD-Vis original" in console.export_text()


def test_report_files_are_self_contained(tmp_path):
    rec, gt = _images()
    res = evaluate_reconstructions(rec, gt, classifier=StubClassifier(), title="run A", **_small())
    written = write_report(res, tmp_path / "rep", recons=rec, gt=gt)
    for key in ("json", "html", "grid", "distributions", "best_worst"):
        assert written[key].is_file()
    page = written["html"].read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # no CDN, no remote resource
    assert "<script" not in page
    assert page.count("data:image/png;base64,") == 3
    assert "unavailable (no weights" in page
    assert load_results(tmp_path / "rep")["title"] == "run A"

    res_b = evaluate_reconstructions(
        gt[:, None], gt, classifier=StubClassifier(), title="run B", metrics=["pixel", "semantic"], **_small()
    )
    both = write_report([res, res_b], tmp_path / "cmp")
    doc = json.loads(both["json"].read_text())
    assert doc["labels"] == ["run A", "run B"] and len(doc["runs"]) == 2
    assert "run B" in both["html"].read_text()
    assert summary_table([res, res_b]).row_count > 0


def _cli():
    app = typer.Typer()
    evaluate_cmd.register(app)
    train_cmd.register(app)

    @app.callback()
    def _root() -> None:  # keep sub-command names
        pass

    return app


def test_commands_end_to_end(tmp_path):
    from test_eval_classifier import synthetic_corpus

    images, labels, names = synthetic_corpus(n_per_class=25)
    np.savez(tmp_path / "corpus.npz", images=images, labels=labels, class_names=np.array(names))
    runner = CliRunner()
    app = _cli()
    r = runner.invoke(
        app,
        [
            "train-classifier",
            "--corpus",
            str(tmp_path / "corpus.npz"),
            "--out",
            str(tmp_path / "clf"),
            "--epochs",
            "2",
            "--input-size",
            "16",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "held-out accuracy" in r.output
    r = runner.invoke(
        app,
        [
            "train-classifier",
            "--corpus",
            str(tmp_path / "corpus.npz"),
            "--out",
            str(tmp_path / "clf"),
            "--epochs",
            "2",
            "--input-size",
            "16",
        ],
    )
    assert "reused" in r.output

    rec, gt = _images(n=6, s=2, size=24)
    (tmp_path / "recon").mkdir()
    np.savez(tmp_path / "recon" / "reconstructions.npz", images=rec, ground_truth=gt)
    args = [
        "evaluate",
        str(tmp_path / "recon"),
        "--classifier",
        str(tmp_path / "clf"),
        "--trials",
        "20",
        "--bootstrap",
        "20",
        "--n-way",
        "2,4,50",
        "--weights-dir",
        str(tmp_path / "weights"),  # none there: FID is reported unavailable
    ]
    r = runner.invoke(app, args + ["--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert any(u["key"] == "fid_2048" for u in res["unavailable"])
    assert res["classifier"]["held_out_accuracy"] is not None
    r = runner.invoke(app, args + ["--out", str(tmp_path / "ev")])
    assert r.exit_code != 0 and "not empty" in str(r.exception)
    r = runner.invoke(
        app,
        [
            "evaluate",
            "--compare",
            str(tmp_path / "ev"),
            str(tmp_path / "recon"),
            "--labels",
            "a,b",
            "--out",
            str(tmp_path / "cmp"),
            "--trials",
            "20",
            "--bootstrap",
            "20",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cmp" / "metrics.json").read_text())["labels"] == ["a", "b"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=600)
        return shutil.which("chromium")
    return None


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed and could not be installed")
    rec, gt = _images()
    res = evaluate_reconstructions(rec, gt, classifier=StubClassifier(), **_small())
    page = write_report(res, tmp_path / "rep", recons=rec, gt=gt)["html"]
    # A probe copy: after load, record whether each image decoded and each table has visible rows.
    probe = tmp_path / "rep" / "probe.html"
    script = (
        "<script>window.addEventListener('load',()=>{const o=document.createElement('pre');o.id='probe';"
        "const imgs=[...document.images].map(i=>i.complete&&i.naturalWidth>0);"
        "const tabs=[...document.querySelectorAll('table')].map(t=>t.rows.length>1&&t.offsetHeight>0);"
        "o.textContent=JSON.stringify({imgs,tabs});document.body.appendChild(o);});</script>"
    )
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-default-apps",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probe.as_uri(),
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"chromium could not run: {exc}")
    m = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout)
    assert m, out.stderr[-2000:]
    state = json.loads(m.group(1).replace("&quot;", '"'))
    assert len(state["imgs"]) == 3 and all(state["imgs"])
    assert len(state["tabs"]) >= 3 and all(state["tabs"])


def _recon_folder(path, n=6, s=2, size=24):
    rec, gt = _images(n=n, s=s, size=size)
    path.mkdir()
    np.savez(path / "reconstructions.npz", images=rec, ground_truth=gt)
    return rec, gt


def test_evaluate_run_writes_the_report_folder(tmp_path):
    from mindvis.errors import OutputExistsError, OutputOverlapError
    from mindvis.eval.config import EvaluateConfig
    from mindvis.eval.evaluate import evaluate_run

    _recon_folder(tmp_path / "recon")
    config = EvaluateConfig(
        metrics="pixel,identification,semantic", n_way="2,3", trials=20, bootstrap=20, seed=7
    )
    out = tmp_path / "ev"
    run = evaluate_run(config, [tmp_path / "recon"], out, classifier=StubClassifier(), title="mine")
    assert run.out == out and run.labels is None and run.report == out / "report.html"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in run.files.values())
    assert {"json", "html", "grid"} <= set(run.files) and all(p.parent == out for p in run.files.values())
    saved = load_results(out)
    assert saved == json.loads(json.dumps(run.runs[0]))  # the returned results are what was written
    assert saved["title"] == "mine" and saved["classifier"]["name"] == "stub"
    assert saved["settings"]["trials"] == 20 and saved["settings"]["seed"] == 7
    assert saved["settings"]["n_way"] == [2, 3] and saved["settings"]["bootstrap"] == 20
    assert {m["group"] for m in saved["metrics"]} == {"pixel", "identification", "semantic"}
    assert "semantic_3way_top1" in {m["key"] for m in saved["metrics"]}
    assert "mine" in (out / "report.html").read_text()
    before = (out / "metrics.json").read_bytes()
    with pytest.raises(OutputExistsError):
        evaluate_run(config, [tmp_path / "recon"], out)
    with pytest.raises(OutputOverlapError):
        evaluate_run(config, [tmp_path / "recon"], tmp_path / "recon" / "ev")
    assert (out / "metrics.json").read_bytes() == before
    again = evaluate_run(
        EvaluateConfig(metrics="pixel", trials=5, bootstrap=0), [tmp_path / "recon"], out, overwrite=True
    )
    assert (
        load_results(out)["settings"]["trials"] == 5
        and again.runs[0]["title"] == f"evaluation of {tmp_path / 'recon'}"
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_evaluate_run_compares_runs_and_checks_its_inputs_first(tmp_path):
    from mindvis.errors import ConfigError, OutputOverlapError
    from mindvis.eval.config import EvaluateConfig
    from mindvis.eval.evaluate import COMPARE_TITLE, evaluate_run

    _recon_folder(tmp_path / "recon")
    config = EvaluateConfig(metrics="pixel,identification", n_way="2", trials=10, bootstrap=10)
    evaluate_run(config, [tmp_path / "recon"], tmp_path / "ev")
    run = evaluate_run(config, [tmp_path / "ev", tmp_path / "recon"], tmp_path / "cmp", compare=True)
    assert run.labels == ["ev", "recon"] and [r["label"] for r in run.runs] == ["ev", "recon"]
    doc = json.loads((tmp_path / "cmp" / "metrics.json").read_text())
    assert doc["labels"] == ["ev", "recon"] and doc["title"] == COMPARE_TITLE and len(doc["runs"]) == 2
    # the first run is read back, the second scored: the same images and settings give the same figures
    first, second = ({m["key"]: m["aggregates"] for m in r["metrics"]} for r in doc["runs"])
    assert first == second
    bad = [
        (dict(compare=True, labels=["a"]), "labels"),
        (dict(compare=True, inputs=[tmp_path / "ev"]), "compare"),
        (dict(inputs=[tmp_path / "recon", tmp_path / "ev", tmp_path / "cmp"]), None),
    ]
    for kwargs, field in bad:
        inputs = kwargs.pop("inputs", [tmp_path / "ev", tmp_path / "recon"])
        with pytest.raises(ConfigError) as err:
            evaluate_run(config, inputs, tmp_path / "refused", **kwargs)
        assert err.value.field == field
    assert not (tmp_path / "refused").exists()
    # a benchmark classifier named as benchmark:DIR is an input too: never inside the output
    (tmp_path / "judge").mkdir()
    with pytest.raises(OutputOverlapError, match="--classifier"):
        evaluate_run(
            config,
            [tmp_path / "recon"],
            tmp_path / "judge" / "ev",
            classifier=f"benchmark:{tmp_path / 'judge'}",
        )

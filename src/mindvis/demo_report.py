"""The demo's report: one self-contained HTML page (images embedded), a headline table as JSON, and PNGs.

It gathers what the demo's steps wrote: the per-variant ``metrics.json`` of ``mindvis evaluate``, the test
grid of the method, and the training curves from the stage A and stage B ``metrics.csv`` files.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
from pathlib import Path
from typing import Any

from mindvis.departures import in_force
from mindvis.errors import MindVisError
from mindvis.eval.report import write_report
from mindvis.eval.suite import metric_rows
from mindvis.utils.io import atomic_write, read_json, write_json

_logger = logging.getLogger(__name__)

#: Which metrics lead the comparison table, in order (``key@aggregate``; ``{n}`` is the largest feasible n).
HEADLINE = [
    ("semantic_{n}way_top1@mean", "semantic n-way top-1 (MinD-Vis protocol), mean"),
    ("semantic_{n}way_top1@best_slot", "semantic n-way top-1, best slot (GT-chosen)"),
    ("ident_pcc_{m}way@mean", "identification m-way, pixel r, mean"),
    ("ident_pcc_2way@mean", "identification 2-way, pixel r, mean"),
    ("ident_clf_features_{m}way@mean", "identification m-way, classifier features, mean"),
    ("pixel_ssim@mean", "SSIM, mean"),
    ("nsd_pixcorr@mean", "PixCorr (NSD), mean"),
]


def _rows_by_key(results: dict[str, Any]) -> dict[str, dict[str, Any]]:

    return {r["key"]: r for r in metric_rows(results) if r["status"] == "ok"}


def _resolve(template: str, keys: set[str]) -> str | None:
    """Fill ``{n}``/``{m}`` with the largest n for which the key exists."""
    if "{" not in template:
        return template if template in keys else None
    best = None
    for k in keys:
        for n in range(2, 1001):
            if k == template.replace("{n}", str(n)).replace("{m}", str(n)):
                best = max(best or (0, ""), (n, k))
                break
    return best[1] if best else None


def _fmt(row: dict[str, Any] | None) -> str:
    if row is None or row["value"] is None:
        return "–"
    v = row["value"]
    ci = row.get("ci95")
    s = f"{100 * v:.1f}" if abs(v) <= 1.0 else f"{v:.3g}"
    if ci and all(c is not None for c in ci):
        lo, hi = ci
        s += f" [{100 * lo:.1f}, {100 * hi:.1f}]" if abs(v) <= 1.0 else f" [{lo:.3g}, {hi:.3g}]"
    return s


def headline_table(evals: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per headline metric: label, chance, and each variant's value with its 95% CI."""
    per = {label: _rows_by_key(read_json(Path(d) / "metrics.json")) for label, d in evals.items()}
    all_keys = set().union(*(set(r) for r in per.values())) if per else set()
    table = []
    for template, desc in HEADLINE:
        key = _resolve(template, all_keys)
        if key is None:
            continue
        first = next((r[key] for r in per.values() if key in r), None)
        n = "".join(ch for ch in key.split("way")[0].split("_")[-1] if ch.isdigit())
        table.append(
            {
                "key": key,
                "metric": desc.replace("n-way", f"{n}-way").replace("m-way", f"{n}-way"),
                "chance": None if first is None else first.get("chance"),
                "values": {
                    label: (
                        None if key not in rows else {"value": rows[key]["value"], "ci95": rows[key]["ci95"]}
                    )
                    for label, rows in per.items()
                },
                "text": {label: _fmt(rows.get(key)) for label, rows in per.items()},
            }
        )
    return table


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _curve(rows: list[dict[str, str]], column: str) -> tuple[list[float], list[float]]:
    """``(epochs trained, values)`` of a logged column; a row logged in epoch ``e`` (0-based) follows ``e + 1``
    epochs of training."""
    xs, ys = [], []
    for r in rows:
        try:
            y = float(r.get(column, "") or "nan")
            xv = float(r.get("epoch", "") or "nan") + 1
        except ValueError:
            continue
        if math.isfinite(y) and math.isfinite(xv):
            xs.append(xv)
            ys.append(y)
    return xs, ys


def _start_points(run_dir: Path, column: str) -> tuple[list[float], list[float]]:
    """Stage B's validations before the finetune (``validation_start.json``), at 0 epochs trained."""
    from mindvis.train.ldm import VALIDATION_START_NAME

    path = run_dir / "stage_b" / VALIDATION_START_NAME
    if not path.is_file():
        return [], []
    try:
        points = read_json(path).get("points", [])
    except Exception as e:  # noqa: BLE001 - a damaged record leaves the curve without its start
        _logger.warning("%s: not read (%s); the stage B curve starts at its first logged validation", path, e)
        return [], []
    ys = [float(p[column]) for p in points if isinstance(p, dict) and column in p]
    return [0.0] * len(ys), ys


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def stage_b_validation_curve(
    run_dir: Path, column: str, rows: list[dict[str, str]] | None = None
) -> tuple[list[float], list[float]]:
    """``(epochs trained, values)`` of one stage B validation metric: the points before the finetune
    (``validation_start.json``, at 0) and then every logged validation (``stage_b/metrics.csv``)."""
    if rows is None:
        rows = _read_csv(run_dir / "stage_b" / "metrics.csv")
    x0, y0 = _start_points(run_dir, column)
    xs, ys = _curve(rows, column)
    return x0 + xs, y0 + ys


def training_curves(run_dir: Path, out_png: Path) -> str | None:
    """Plot stage A validation correlation and stage B validation metrics; returns base64 PNG or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for stage, folder in (("stage A1 (pretrain)", "stage_a1"), ("stage A2 (finetune)", "stage_a2")):
        rows = _read_csv(run_dir / folder / "metrics.csv")
        cols = [c for c in (rows[0].keys() if rows else []) if "val" in c and "corr" in c]
        if cols:
            panels.append((stage, [(c, *_curve(rows, c)) for c in cols[:1]], "masked-patch Pearson r"))
    rows = _read_csv(run_dir / "stage_b" / "metrics.csv")
    if rows:
        # the headline figures first, without their "_best" (ground-truth-chosen sample) twins
        preferred = ["val/semantic_10way_top1", "val/ident_clf_features_2way", "val/ident_pcc_2way"]
        cols = [c for c in preferred if c in rows[0]] or [
            c
            for c in rows[0]
            if c.startswith("val/") and ("semantic" in c or "ident" in c) and not c.endswith("_best")
        ]
        if cols:
            series = [(c, *stage_b_validation_curve(run_dir, c, rows)) for c in cols[:4]]
            panels.append(("stage B (validation)", series, "accuracy"))
    panels = [p for p in panels if any(len(xs) for _, xs, _ in p[1])]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, series, ylabel) in zip(axes[0], panels, strict=True):
        for name, xs, ys in series:
            ax.plot(xs, ys, marker="o", ms=3, label=name.replace("val/", ""))
        ax.set_title(title)
        ax.set_xlabel("epochs trained")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    b64 = _png_b64(fig)
    with atomic_write(out_png) as fh:
        fh.write(base64.b64decode(b64))
    plt.close(fig)
    return b64


EXPLANATION = """
<p><b>What these numbers are.</b> The fMRI here comes from SynthCortex, a simulated visual cortex: population
receptive fields over Gabor-energy, colour and contrast features with a compressive nonlinearity, a
category-tuned higher area, and realistic noise (heavy-tailed voxel SNR, spatially correlated noise, run
drifts). The test fMRI is the average of repeated presentations, as in GOD. The method sees only the
simulated voxels; the images are decoded by the trained latent diffusion model.</p>
<p><b>How to read them.</b> The n-way semantic accuracy is the MinD-Vis protocol: the benchmark's classifier
labels each ground-truth image, and a trial succeeds when the reconstruction's probability for that class beats
n&minus;1 random other classes. It measures agreement with a classifier, not identification of the image; the
identification rows pick the right image among the test images by pixel correlation or classifier features.
"Best sample slot" chooses among the samples with the ground truth, as the paper's best figures do; "mean"
does not. Brackets are 95% bootstrap intervals over test images; chance is given per row.</p>
<p><b>What they do not say.</b> A simulator is not a brain. These figures show that the pipeline learns what
the simulator put into the voxels, and how the variants compare on equal footing; they are not comparable to
the paper's GOD or BOLD5000 numbers, and small differences within the intervals are not findings.</p>
"""


def departures(preset: Any) -> list[str]:
    """Plain-language list of the preset's settings that the original does not have (:mod:`mindvis.departures`)."""

    out = []
    for d in in_force(preset):
        value = preset.options(d.preset_step).get(d.option.removeprefix("--"))
        given = f"{d.option} {value}" if value is not None and not isinstance(value, bool) else d.option
        out.append(f"{d.what}: {d.behaviour_ours} ({given})")
    return out


def above_chance_summary(table: list[dict[str, Any]], label: str) -> str:
    """One sentence: which of ``label``'s headline figures have a 95% interval entirely above chance.

    Rows without a chance level (SSIM, PixCorr) and best-sample rows (the ground truth picks among the samples,
    so their chance is above the listed single-sample level) are left out.
    """
    above, total = [], 0
    for row in table:
        v, chance = row["values"].get(label), row["chance"]
        if (
            v is None
            or chance is None
            or not v.get("ci95")
            or "SSIM" in row["metric"]
            or "PixCorr" in row["metric"]
            or "best" in row["metric"]
        ):
            continue
        total += 1
        if v["ci95"][0] > chance:
            above.append(row["metric"])
    if total == 0:
        return f"{label}: no figure with a chance level and an interval to compare."
    if not above:
        return (
            f"None of the {total} chance-referenced figures of {label} is above chance beyond its 95% interval: "
            "its reconstructions do not carry the seen image in this run (for the method: the linear probes "
            "below show which representation loses the information, and whether stage B uses its fMRI at all)."
        )
    return f"{label} is above chance beyond its 95% interval on {len(above)} of {total} figures: {', '.join(above)}."


def stand_ins_summary(run_dir: Path) -> dict[str, Any]:
    """The ceilings of the semantic metric in this run: how often the judge names a never-seen image's class,
    and how often the prior's class samples are judged as their class (without guidance and with it).

    From the shipped prior's evaluation (``prior/ARTIFACT.json``) when the run used the shipped stand-ins;
    otherwise from what the run's own judge and prior recorded in training (``classifier/config.json``,
    ``prior/metrics.json``). Missing figures are None.
    """
    out: dict[str, Any] = {"source": None, "judge": None, "judge_where": None, "samples": {}}
    artifact = run_dir / "prior" / "ARTIFACT.json"
    clf = run_dir / "classifier" / "config.json"
    try:
        ev = read_json(artifact).get("evaluation") if artifact.is_file() else None
        if ev:
            out["source"] = "shipped"
            out["judge"] = ev.get("judge", {}).get("accuracy")
            out["judge_where"] = "composites of never-seen test-split objects"
            out["samples"] = {
                f"{float(v['guidance_scale']):g}": v["accuracy"] for v in ev.get("class_samples", {}).values()
            }
            return out
        if clf.is_file():
            out["source"] = "trained in this run"
            out["judge"] = read_json(clf).get("held_out_accuracy")
            out["judge_where"] = "held-out corpus images"
        metrics = run_dir / "prior" / "metrics.json"
        if metrics.is_file():
            cs = read_json(metrics).get("class_samples") or {}
            if "accuracy" in cs:
                out["samples"] = {f"{float(cs.get('guidance_scale', 1.0)):g}": cs["accuracy"]}
    except (MindVisError, KeyError, TypeError, ValueError) as exc:
        _logger.warning("the stand-ins' figures could not be read: %s", exc)
    return out


def stand_ins_section(run_dir: Path, guidance: float | None) -> str:
    """HTML: the judge's and the prior's figures as the ceilings of the semantic metric, with the shipped
    evaluation's figures (confusion matrix, class samples) when there are any."""
    info = stand_ins_summary(run_dir)
    if info["judge"] is None and not info["samples"]:
        return ""
    pct = lambda v: "–" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    samples = (
        ", ".join(
            f"{pct(a)} at guidance {g}"
            for g, a in sorted(info["samples"].items(), key=lambda kv: float(kv[0]))
        )
        or "(not measured)"
    )
    used = f" This run samples at guidance {guidance:g}." if guidance is not None else ""
    figs = ""
    for name, alt in (
        ("class_samples.png", "class samples"),
        ("judge_confusion.png", "judge confusion matrix"),
    ):
        png = run_dir / "prior" / "evaluation" / name
        if png.is_file():
            figs += f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"> '
    return f"""<h2>The judge and the prior: the ceilings of the semantic metric</h2>
<p>The benchmark's stand-ins for the original's ViT-H/14 judge and ImageNet label2img prior ({
        html.escape(str(info["source"]))
    }). The judge names the class of {pct(info["judge"])} of {
        html.escape(str(info["judge_where"]))
    }; of the prior's class samples, the judge assigns to the requested class
{html.escape(samples)}.{
        html.escape(used)
    } A reconstruction is judged right no more often than the judge is right,
and no more often than the prior can draw the class: these are the ceilings of the semantic figures above.</p>
{figs}"""


def probe_section(run_dir: Path) -> str:
    """HTML of the ``probe/`` step: the linear-probe table, its chart and the conditioning-use figures."""
    path = run_dir / "probe" / "probe.json"
    if not path.is_file():
        return ""
    data = read_json(path)
    esc = html.escape

    def cell(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    rows = "".join(
        f"<tr><td>{esc(r['source'])}</td><td>{esc(r['level'])}</td><td>{r['dims']}</td>"
        f"<td>{cell(r['class_accuracy'])}</td><td>{cell(r['class_chance'])}</td><td>{cell(r['pixel_2way'])}</td></tr>"
        for r in data.get("results", [])
    )
    use = "".join(
        f"<tr><td>{esc(k)}</td><td>{u['loss_true']:.5f}</td><td>{u['loss_shuffled']:.5f}</td>"
        f"<td>{u['gap_percent']:+.2f} %</td></tr>"
        for k, u in data.get("conditioning_use", {}).items()
    )
    png = run_dir / "probe" / "probe.png"
    img = (
        f'<img alt="linear probes" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">'
        if png.is_file()
        else ""
    )
    return f"""<h2>Where the stimulus information goes (linear probes)</h2>
<p>Each representation of the test fMRI is read out linearly (ridge, trained on the training split): the image's
class, and its pixels scored by 2-way identification. A level far below the raw voxels is where information is
lost. Percentages.</p>
<table><tr><th>model</th><th>level</th><th>dims</th><th>class accuracy</th><th>chance</th>
<th>pixel 2-way</th></tr>{rows}</table>{img}
<p>Does stage B use its fMRI at all? Denoising loss on training images with their own fMRI and with another
sample's (same noise and timesteps): a gap near 0 means the UNet ignores the fMRI, whatever the context holds.</p>
<table><tr><th>model</th><th>own fMRI</th><th>another sample's</th><th>gap</th></tr>{use}</table>"""


def write_demo_report(
    run_dir: Path,
    out: Path,
    evals: dict[str, Path],
    preset: Any,
    steps_seconds: dict[str, float] | None = None,
) -> Path:
    """Write ``out/index.html``, ``out/headline.json``, ``out/curves.png`` and a side-by-side comparison."""

    out.mkdir(parents=True, exist_ok=True)
    table = headline_table(evals)
    write_json(out / "headline.json", table)
    write_json(out / "stand_ins.json", stand_ins_summary(run_dir))
    labels = list(evals)
    results = [read_json(Path(d) / "metrics.json") for d in evals.values()]
    try:
        write_report(
            results, out / "comparison", labels=labels, title="mindvis demo: all variants side by side"
        )
    except Exception as exc:  # the headline table below still stands on its own
        _logger.warning("comparison report failed: %s", exc)
    curves = training_curves(run_dir, out / "curves.png")
    first_eval = next(iter(evals.values()), None)
    grid_b64 = None
    if first_eval is not None and (Path(first_eval) / "grid.png").is_file():
        grid_b64 = base64.b64encode((Path(first_eval) / "grid.png").read_bytes()).decode()
    esc = html.escape
    head = "".join(f"<th>{esc(lab)}</th>" for lab in labels)
    changed = (
        " Changed from the preset with <code>--set</code>: "
        + ", ".join(f"<code>{esc(item)}</code>" for item in preset.overrides)
        + "."
        if preset.overrides
        else ""
    )
    body = ""
    for row in table:
        chance = row["chance"]
        ch = "–" if chance is None else (f"{100 * chance:.1f}" if abs(chance) <= 1 else f"{chance:.3g}")
        cells = "".join(f"<td>{esc(row['text'][lab])}</td>" for lab in labels)
        body += f"<tr><td>{esc(row['metric'])}</td><td>{ch}</td>{cells}</tr>\n"
    verdict = f"<p><b>In this run.</b> {esc(above_chance_summary(table, labels[0]))}</p>" if labels else ""
    diffs = departures(preset)
    departs = (
        "<p><b>Departures from the original in this run.</b> "
        + esc("; ".join(diffs))
        + ". docs/departures.md lists every departure with its reason; without the context warm start and "
        "guidance this benchmark's tiny models stay at chance (docs/synthcortex.md).</p>"
        if diffs
        else ""
    )
    timing = ""
    if steps_seconds:
        timing = (
            "<h2>Time per step</h2><table><tr><th>step</th><th>seconds</th></tr>"
            + "".join(f"<tr><td>{esc(k)}</td><td>{v:.0f}</td></tr>" for k, v in steps_seconds.items())
            + "</table>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mindvis demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}
th{{background:#f3f3f3}}img{{max-width:100%}}</style></head><body>
<h1>mindvis demo — preset <code>{esc(preset.name)}</code></h1>
<p>{esc(preset.note)}.{changed} Values are percentages where they are fractions.</p>
<h2>Method against baseline and ablations (same test set)</h2>
<table><tr><th>metric</th><th>chance</th>{head}</tr>
{body}</table>
<p>Full tables per variant: <code>eval/&lt;variant&gt;/report.html</code>; all metrics side by side:
<a href="comparison/report.html">comparison/report.html</a>.</p>
{verdict}
{departs}
{EXPLANATION}
<h2>Test reconstructions of the method (ground truth first in each row)</h2>
{f'<img alt="test grid" src="data:image/png;base64,{grid_b64}">' if grid_b64 else "<p>(no grid)</p>"}
<h2>Training curves</h2>
{f'<img alt="training curves" src="data:image/png;base64,{curves}">' if curves else "<p>(no curves logged)</p>"}
<p>Stage B's points at 0 epochs are validations before the diffusion finetune (<code>--validate-start</code>): the
untrained model and, with a context warm start, the model right after it.</p>
{stand_ins_section(run_dir, preset.reconstruct.guidance_scale)}
{probe_section(run_dir)}
{timing}
</body></html>"""
    with atomic_write(out / "index.html", "w") as fh:
        fh.write(page)
    return out / "index.html"

"""Evaluation reports: ``metrics.json``, a self-contained HTML page, PNG figures and a terminal table.

:func:`write_report` writes into one folder:

- ``metrics.json``: the results dict of :func:`mindvis.eval.suite.evaluate_reconstructions` (versions, seeds,
  metric definitions, n, per-image values), or for a comparison ``{"format": "mindvis-eval-compare/1",
  "runs": [...]}``;
- ``report.html``: tables, the ground-truth-versus-samples grid, metric distributions and best/worst cases,
  with every image embedded as base64 PNG (no external resources, no scripts);
- ``grid.png``, ``distributions.png``, ``best_worst.png``: the same figures as files.

:func:`print_summary` prints a compact rich table.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mindvis.errors import DataError
from mindvis.eval.suite import metric_rows
from mindvis.utils.images import image_grid, png_bytes
from mindvis.utils.io import atomic_write, read_json, write_json

logger = logging.getLogger(__name__)

COMPARE_FORMAT = "mindvis-eval-compare/1"
_AGG_SHORT = {
    "mean": "mean",
    "best_slot": "best slot",
    "best_per_image": "best/image",
    "pooled": "pooled",
    "best_slot_min": "best slot",
}
_RANK_PREFERENCE = ("semantic_", "ident_clf_features_2way", "ident_pcc_2way", "pixel_ssim", "pixel_pcc")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.muted{color:#777}.unavail{color:#a33}.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.4em .8em;margin:.4em 0}
img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}
"""


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def _fmt_ci(ci) -> str:
    return "—" if not ci else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def _fig_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _grid_png(recons: np.ndarray, gt: np.ndarray, items: list[int], gap: int = 4) -> bytes:
    """PNG of one row per item: the ground truth, a gap three times as wide, then its samples; every image at
    the ground-truth size capped at 96 px (:func:`mindvis.utils.images.image_grid`)."""
    cell = min(96, max(gt.shape[1:3]))
    return png_bytes(image_grid(recons[items], gt[items], size=cell, pad=gap, gt_gap=2 * gap))


def _distribution_png(results: dict) -> bytes | None:
    entries = [e for e in results.get("metrics", []) if len(e.get("per_image", [])) > 1]
    if not entries:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(entries) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, e in zip(axes.flat, entries, strict=False):
        vals = np.asarray(e["per_image"], dtype=float)
        ax.hist(vals, bins=min(20, max(5, len(vals) // 3)), color="#4a7ab5", alpha=0.85)
        ax.axvline(float(vals.mean()), color="k", lw=1.2, label="mean")
        if e.get("chance") is not None:
            ax.axvline(float(e["chance"]), color="#c33", ls="--", lw=1.2, label="chance")
        ax.set_title(e["label"], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(entries) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Per-image values (mean over samples); dashed: chance", fontsize=10)
    fig.tight_layout()
    return _fig_png(fig)


def ranking_metric(results: dict) -> dict | None:
    """The metric used to rank best and worst cases: semantic > classifier-feature > pixel identification."""
    entries = results.get("metrics", [])
    for prefix in _RANK_PREFERENCE:
        hits = [e for e in entries if e["key"].startswith(prefix)]
        if hits:
            return hits[-1]
    return entries[0] if entries else None


def best_worst_items(results: dict, k: int = 3) -> tuple[dict | None, list[int], list[int]]:
    """``(metric, best item indices, worst item indices)`` by the per-image value of :func:`ranking_metric`."""
    e = ranking_metric(results)
    if e is None:
        return None, [], []
    vals = np.asarray(e["per_image"], dtype=float)
    order = np.argsort(-vals if e["higher_is_better"] else vals, kind="stable")
    k = min(k, len(order) // 2 or 1)
    return e, order[:k].tolist(), order[::-1][:k].tolist()


# --------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _cell(agg: dict | None) -> str:
    if not agg:
        return "<td class='num muted'>—</td>"
    return f"<td class='num'>{_fmt(agg.get('value'))}<br><span class='muted'>{_fmt_ci(agg.get('ci95'))}</span></td>"


def _metrics_table(results: dict) -> str:
    """One row per metric: mean over samples, best slot, best per image (value and 95% CI)."""
    out = [
        '<table class="metrics"><thead><tr><th>group</th><th>metric</th><th>mean over samples</th>'
        "<th>best slot</th><th>best sample per image</th><th>chance</th><th>better</th><th>definition</th>"
        "</tr></thead><tbody>"
    ]
    for e in results.get("metrics", []):
        a = e["aggregates"]
        out.append(
            f"<tr><td>{html.escape(e['group'])}</td><td>{html.escape(e['label'])}</td>{_cell(a.get('mean'))}"
            f"{_cell(a.get('best_slot'))}{_cell(a.get('best_per_image'))}<td class='num'>{_fmt(e.get('chance'))}</td>"
            f"<td>{'higher' if e['higher_is_better'] else 'lower'}</td>"
            f"<td class='muted'>{html.escape(e['definition'])}</td></tr>"
        )
    for f in (results.get("fid") or {}).values():
        ci = f.get("ci95", {})
        out.append(
            f"<tr><td>fid</td><td>{html.escape(f['label'])}</td>"
            f"{_cell({'value': f['mean'], 'ci95': ci.get('mean')})}"
            f"{_cell({'value': f['best_slot'], 'ci95': ci.get('best_slot')})}"
            f"<td class='num'>pooled {_fmt(f['pooled'])}</td><td class='num'>—</td><td>lower</td>"
            f"<td class='muted'>{html.escape(f['definition'])}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _unavailable_table(results: dict) -> str:
    un = results.get("unavailable", [])
    if not un:
        return "<p>Every requested metric was computed.</p>"
    out = ['<table class="unavailable"><thead><tr><th>metric</th><th>status</th></tr></thead><tbody>']
    for u in un:
        out.append(
            f"<tr><td>{html.escape(u['label'])}</td><td class='unavail'>unavailable "
            f"({html.escape(u['reason'])})</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _classifier_block(results: dict) -> str:
    c = results.get("classifier")
    if not c:
        return "<p>No classifier: the semantic metric and feature identification were not computed.</p>"
    parts = [f"<p>Classifier: <b>{html.escape(str(c.get('name')))}</b> ({c.get('num_classes')} classes)."]
    if c.get("held_out_accuracy") is not None:
        parts.append(
            f" Held-out accuracy on its training corpus: <b>{_fmt(c['held_out_accuracy'], 3)}</b> "
            f"(n = {c.get('n_holdout')}, chance ≈ {_fmt(c.get('held_out_chance'), 3)})."
        )
    if c.get("accuracy_on_ground_truth") is not None:
        parts.append(
            f" Accuracy on these ground-truth test images: <b>{_fmt(c['accuracy_on_ground_truth'], 3)}</b>."
        )
    if c.get("training_data_sha256"):
        parts.append(f" <span class='muted'>training data sha256 {c['training_data_sha256'][:16]}…</span>")
    parts.append(" A reconstruction metric is only as good as its judge.</p>")
    return "".join(parts)


def _settings_table(results: dict) -> str:
    st = dict(results.get("settings", {}))
    st.pop("weights", None)
    d = results.get("data", {})
    items = {
        **{f"data.{k}": v for k, v in d.items() if k != "ids"},
        **st,
        **{f"version.{k}": v for k, v in results.get("versions", {}).items()},
        **{f"time.{k} (s)": v for k, v in results.get("timings", {}).items()},
    }
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in items.items()
    )
    return f'<table class="settings"><tbody>{rows}</tbody></table>'


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def _compare_table(runs: list[dict], labels: list[str]) -> str:
    keyed: dict[str, dict] = {}
    order: list[str] = []
    for i, res in enumerate(runs):
        for r in metric_rows(res):
            if r["status"] != "ok" or r["aggregate"] not in ("mean", "best_slot", "best_slot_min"):
                continue
            if r["key"] not in keyed:
                keyed[r["key"]] = {
                    "label": r["label"],
                    "agg": r["aggregate"],
                    "chance": r["chance"],
                    "vals": {},
                }
                order.append(r["key"])
            keyed[r["key"]]["vals"][i] = r
            if r["chance"] is not None and keyed[r["key"]]["chance"] != r["chance"]:
                keyed[r["key"]]["chance"] = "per run"  # empirical chance levels differ between runs
    head = "".join(f"<th>{html.escape(lab)}</th>" for lab in labels)
    out = [
        f'<table class="compare"><thead><tr><th>metric</th><th>aggregate</th><th>chance</th>{head}</tr></thead><tbody>'
    ]
    for key in order:
        k = keyed[key]
        cells = []
        for i in range(len(runs)):
            r = k["vals"].get(i)
            cells.append(
                "<td class='num muted'>—</td>"
                if r is None
                else f"<td class='num'>{_fmt(r['value'])}<br><span class='muted'>{_fmt_ci(r['ci95'])}</span></td>"
            )
        out.append(
            f"<tr><td>{html.escape(k['label'])}</td><td>{_AGG_SHORT.get(k['agg'], k['agg'])}</td>"
            f"<td class='num'>{k['chance'] if isinstance(k['chance'], str) else _fmt(k['chance'])}</td>"
            f"{''.join(cells)}</tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def run_label(results: dict, default: str) -> str:
    return str(results.get("label") or results.get("title") or default)


def write_report(
    results: dict[str, Any] | list[dict[str, Any]],
    out_dir: str | Path,
    *,
    title: str | None = None,
    recons: np.ndarray | None = None,
    gt: np.ndarray | None = None,
    compare: list[dict[str, Any]] | None = None,
    labels: list[str] | None = None,
    max_grid_items: int = 50,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.html`` and PNG figures into ``out_dir``.

    Args:
        results: one results dict from :func:`~mindvis.eval.suite.evaluate_reconstructions`, or a list of
            them for a side-by-side comparison (ablations, baselines).
        out_dir: output folder (created; existing report files are replaced atomically).
        title: page title (default: the results' title).
        recons: ``[N, S, H, W, 3]`` uint8, for the image grid and best/worst cases (optional).
        gt: ``[N, H, W, 3]`` uint8, with ``recons``.
        compare: further results dicts to put beside ``results`` (same as passing a list).
        labels: column names of the compared runs (default: their titles).
        max_grid_items: at most this many items in the grid.

    Returns:
        ``{"json": path, "html": path, ...png paths}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = list(results) if isinstance(results, list) else [results]
    runs += list(compare or [])
    written: dict[str, Path] = {}
    if len(runs) > 1:
        labels = labels or [run_label(r, f"run {i + 1}") for i, r in enumerate(runs)]
        if len(labels) != len(runs):
            raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
        title = title or "mindvis comparison"
        write_json(
            out_dir / "metrics.json",
            {"format": COMPARE_FORMAT, "title": title, "labels": labels, "runs": runs},
        )
        body = [
            "<h2>Side by side</h2><p>Value and bootstrap 95% interval over test images; 'best slot' is the "
            "sample slot with the best image mean (the paper's 'max').</p>",
            _compare_table(runs, labels),
        ]
        for lab, res in zip(labels, runs, strict=True):
            body.append(f"<h2>{html.escape(lab)}: unavailable metrics</h2>{_unavailable_table(res)}")
        page = _page(title, "".join(body))
    else:
        res = runs[0]
        title = title or res.get("title") or "mindvis evaluation"
        write_json(out_dir / "metrics.json", res)
        d = res.get("data", {})
        body = [
            f"<p>{d.get('n_items')} test images × {d.get('n_samples')} samples; seed "
            f"{res['settings'].get('seed')}, {res['settings'].get('trials')} trials per reconstruction, "
            f"{res['settings'].get('bootstrap')} bootstrap resamples. Intervals are 95% bootstrap intervals "
            "over test images.</p>"
        ]
        body += [f"<div class='note'>{html.escape(n)}</div>" for n in res.get("notes", [])]
        body.append(f"<h2>Judge</h2>{_classifier_block(res)}")
        body.append(f"<h2>Metrics</h2>{_metrics_table(res)}")
        body.append(f"<h2>Not computed</h2>{_unavailable_table(res)}")
        dist = _distribution_png(res)
        if dist is not None:
            (out_dir / "distributions.png").write_bytes(dist)
            written["distributions"] = out_dir / "distributions.png"
            body.append(f"<h2>Distributions</h2>{_img_tag(dist, 'metric distributions')}")
        if recons is not None and gt is not None:
            items = list(range(min(len(gt), max_grid_items)))
            grid = _grid_png(recons, gt, items)
            with atomic_write(out_dir / "grid.png") as fh:
                fh.write(grid)
            written["grid"] = out_dir / "grid.png"
            body.append(
                f"<h2>Ground truth (left) and samples</h2><p class='muted'>first {len(items)} items</p>"
                f"{_img_tag(grid, 'ground truth and samples')}"
            )
            metric, best, worst = best_worst_items(res)
            if metric is not None and best:
                png = _grid_png(recons, gt, best + worst)
                with atomic_write(out_dir / "best_worst.png") as fh:
                    fh.write(png)
                written["best_worst"] = out_dir / "best_worst.png"
                pv = metric["per_image"]
                desc = ", ".join(f"#{i} {_fmt(pv[i], 3)}" for i in best)
                desc2 = ", ".join(f"#{i} {_fmt(pv[i], 3)}" for i in worst)
                body.append(
                    f"<h2>Best and worst cases</h2><p>Ranked by {html.escape(metric['label'])} "
                    f"(per image, mean over samples). Top rows best: {desc}; then worst: {desc2}.</p>"
                    f"{_img_tag(png, 'best and worst cases')}"
                )
        body.append(f"<h2>Settings and versions</h2>{_settings_table(res)}")
        page = _page(title, "".join(body))
    with atomic_write(out_dir / "report.html", "w") as fh:
        fh.write(page)
    written["json"] = out_dir / "metrics.json"
    written["html"] = out_dir / "report.html"
    return written


def load_results(path: str | Path) -> dict[str, Any]:
    """Read an evaluation's ``metrics.json`` (a file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    res = read_json(path)
    if not isinstance(res, dict) or res.get("format") != "mindvis-eval/1":
        raise DataError(
            "not a mindvis evaluation (format 'mindvis-eval/1' expected)", path=path, field="format"
        )
    return res


def summary_table(results: dict[str, Any] | list[dict[str, Any]], labels: list[str] | None = None):
    """A compact rich Table: mean and best-slot values with intervals, chance, and unavailable metrics."""
    from rich.table import Table

    runs = results if isinstance(results, list) else [results]
    labels = labels or [run_label(r, f"run {i + 1}") for i, r in enumerate(runs)]
    table = Table(title=None if len(runs) > 1 else runs[0].get("title"), show_lines=False)
    table.add_column("metric")
    table.add_column("agg.")
    for lab in labels:
        table.add_column(lab if len(runs) > 1 else "value [95% CI]", justify="right")
    table.add_column("chance", justify="right")
    keyed: dict[str, dict] = {}
    for i, res in enumerate(runs):
        for r in metric_rows(res):
            if r["status"] == "ok" and r["aggregate"] not in ("mean", "best_slot", "best_slot_min"):
                continue
            k = keyed.setdefault(r["key"], {"row": r, "vals": {}})
            k["vals"][i] = r
    for k in keyed.values():
        r = k["row"]
        if r["status"] != "ok":
            if len(runs) == 1:
                table.add_row(r["label"], "", f"[red]unavailable ({r['reason']})[/red]", "")
            continue
        cells = []
        for i in range(len(runs)):
            v = k["vals"].get(i)
            cells.append(
                "—" if v is None or v["status"] != "ok" else f"{_fmt(v['value'])} {_fmt_ci(v['ci95'])}"
            )
        table.add_row(r["label"], _AGG_SHORT.get(r["aggregate"], r["aggregate"]), *cells, _fmt(r["chance"]))
    return table


def print_summary(
    results: dict[str, Any] | list[dict[str, Any]], labels: list[str] | None = None, console=None
) -> None:
    """Print :func:`summary_table` (command-line use)."""
    from rich.console import Console

    (console or Console()).print(summary_table(results, labels))

"""Plots (PNG and SVG) and a one-page report.html of a sweep's result rows.

    from tasks.sweep.report import write_report, closest
    files = write_report(rows, "out/")   # out/plots/*.png|svg and out/report.html; returns the paths

- ``plots/axis-<name>``: each metric against the values of each swept control (one family of settings
  per control; a crossed grid gives one line per value of its other controls), with the bootstrap
  intervals and the reference's value as a dashed line;
- ``plots/plane``: the diversity-fluency plane (perplexity x diversity of every setting), the reference
  marked with a star;
- ``plots/heatmap-<name>``: context-length bucket x the control's values, coloured by PMI (relation of the
  continuation to its context); for every family with more than one value when there are several buckets.

``closest(rows)`` names, for every metric the reference has, the setting whose value is nearest to it,
and over all of them together the setting with the smallest mean distance (each metric's distance scaled
by the largest distance of any setting on it); MAUVE (higher is closer) is named on its own.
Files are written atomically; matplotlib draws with the Agg backend.
"""
from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from util.files import atomic_file

from .run import CONTEXT_METRICS, METRICS, REFERENCE_METRICS

#: The metrics drawn against each control (in this order).
PLOTTED = ("rep2", "rep4", "diversity", "distinct2", "self_bleu", "loop", "zipf", "perplexity", "pmi", "cosine",
           "length", "early_end", "mauve")
LABELS = {"rep2": "rep-2", "rep3": "rep-3", "rep4": "rep-4", "diversity": "diversity", "distinct2": "distinct-2",
          "distinct3": "distinct-3", "self_bleu": "Self-BLEU", "loop": "ends in a loop", "zipf": "Zipf coefficient",
          "perplexity": "perplexity", "pmi": "PMI (nats/token)", "cosine": "cosine(context, text)",
          "length": "length (tokens)", "early_end": "early end-of-text", "mauve": "MAUVE"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _numeric(v) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _reference(rows: Sequence[dict]) -> Optional[dict]:
    return next((r for r in rows if r["setting"] == "reference" and r["bucket"] == "all"), None)


def _settings(rows: Sequence[dict]) -> List[dict]:
    return [r for r in rows if r["setting"] != "reference" and r["bucket"] == "all"]


def closest(rows: Sequence[dict]) -> Dict[str, str]:
    """metric -> the label of the setting closest to the reference on it, plus 'all' and 'mauve'."""
    ref = _reference(rows)
    settings = _settings(rows)
    out: Dict[str, str] = {}
    if ref is None or not settings:
        return out
    scaled: Dict[str, List[float]] = {s["setting"]: [] for s in settings}
    for m in REFERENCE_METRICS:
        if ref.get(m) is None:
            continue
        have = [s for s in settings if s.get(m) is not None]
        if not have:
            continue
        dist = {s["setting"]: abs(s[m] - ref[m]) for s in have}
        out[m] = min(dist, key=dist.get)
        worst = max(dist.values()) or 1.0
        for name in scaled:
            scaled[name].append(dist[name] / worst if name in dist else 1.0)
    if any(scaled.values()):
        mean = {k: sum(v) / len(v) for k, v in scaled.items() if v}
        out["all"] = min(mean, key=mean.get)
    mauves = {s["setting"]: s["mauve"] for s in settings if s.get("mauve") is not None}
    if mauves:
        out["mauve"] = max(mauves, key=mauves.get)
    return out


def _save(fig, base: Path) -> List[Path]:
    paths = []
    for ext in ("png", "svg"):
        path = base.with_suffix("." + ext)
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format=ext, dpi=110 if ext == "png" else None, bbox_inches="tight")
        paths.append(path)
    return paths


def _families(rows: Sequence[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in rows:
        if r["setting"] != "reference":
            out.setdefault(r["family"], []).append(r)
    return out


def plot_axes(rows: Sequence[dict], directory: Path) -> List[Path]:
    """One figure per swept control: every metric against the control's values."""
    plt = _pyplot()
    ref = _reference(rows)
    paths = []
    for family, members in _families(rows).items():
        names = family.split("×")
        for axis in names:
            alls = [r for r in members if r["bucket"] == "all" and _numeric(r["values"].get(axis)) is not None]
            if not alls:
                continue
            # one line per combination of the other controls (a crossed grid), else a single line
            others = [n for n in names if n != axis]
            lines: Dict[str, List[dict]] = {}
            for r in alls:
                lines.setdefault(" ".join(f"{n}={r['values'].get(n)}" for n in others), []).append(r)
            metrics = [m for m in PLOTTED if any(r.get(m) is not None for r in alls)]
            cols = 4
            nrows = max(1, math.ceil(len(metrics) / cols))
            fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
            for k, m in enumerate(metrics):
                ax = axes[k // cols][k % cols]
                for label, rs in lines.items():
                    rs = sorted(rs, key=lambda r: _numeric(r["values"][axis]))
                    xs = [_numeric(r["values"][axis]) for r in rs]
                    ys = [r.get(m) if r.get(m) is not None else float("nan") for r in rs]
                    # (a percentile interval need not hold the estimate, e.g. Zipf's: clipped at 0)
                    lo = [max(0.0, y - r[m + "_low"]) if r.get(m + "_low") is not None and y == y else 0.0
                          for y, r in zip(ys, rs)]
                    hi = [max(0.0, r[m + "_high"] - y) if r.get(m + "_high") is not None and y == y else 0.0
                          for y, r in zip(ys, rs)]
                    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=3, capsize=2, label=label or None)
                if ref is not None and ref.get(m) is not None:
                    ax.axhline(ref[m], color="k", ls="--", lw=0.8, label="reference")
                xs_all = [_numeric(r["values"][axis]) for r in alls]
                if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20:  # top_k=1..80: a log axis
                    ax.set_xscale("log")
                if m == "perplexity" and all((r.get(m) or 0) > 0 for r in alls):
                    ax.set_yscale("log")
                ax.set_title(LABELS.get(m, m), fontsize=9)
                ax.set_xlabel(axis, fontsize=8)
                ax.tick_params(labelsize=7)
            for k in range(len(metrics), nrows * cols):
                axes[k // cols][k % cols].axis("off")
            handles, labels = axes[0][0].get_legend_handles_labels()
            if handles and (len(lines) > 1 or ref is not None):
                fig.legend(handles, labels, loc="lower center", ncol=min(4, len(handles)), fontsize=8,
                           bbox_to_anchor=(0.5, -0.02))
            fig.suptitle(f"metrics against {axis}" + (f" (grid {family})" if others else ""), fontsize=10)
            fig.tight_layout()
            paths += _save(fig, directory / f"axis-{_safe(axis)}" if not others else
                           directory / f"axis-{_safe(axis)}-in-{_safe(family)}")
            plt.close(fig)
    return paths


def plot_plane(rows: Sequence[dict], directory: Path) -> List[Path]:
    """Perplexity (fluency) x diversity of every setting; the reference as a star."""
    plt = _pyplot()
    settings = [r for r in _settings(rows) if r.get("perplexity") is not None and r.get("diversity") is not None]
    if not settings:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    families = sorted({r["family"] for r in settings})
    for fam in families:
        rs = [r for r in settings if r["family"] == fam]
        ax.scatter([r["perplexity"] for r in rs], [r["diversity"] for r in rs], label=fam, s=22)
        for r in rs:
            ax.annotate(r["setting"], (r["perplexity"], r["diversity"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    ref = _reference(rows)
    if ref is not None and ref.get("perplexity") is not None and ref.get("diversity") is not None:
        ax.scatter([ref["perplexity"]], [ref["diversity"]], marker="*", s=180, color="k", label="reference")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity of the continuation (log scale; lower = more fluent)")
    ax.set_ylabel("diversity = (1-rep-2)(1-rep-3)(1-rep-4)")
    ax.set_title("diversity-fluency plane")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = _save(fig, directory / "plane")
    plt.close(fig)
    return paths


def plot_heatmaps(rows: Sequence[dict], directory: Path, metric: str = "pmi") -> List[Path]:
    """Context-length bucket x a control's values, coloured by ``metric``, for each single-control family."""
    plt = _pyplot()
    paths = []
    for family, members in _families(rows).items():
        if "×" in family:
            continue
        buckets = []
        for r in members:
            if r["bucket"] != "all" and r["bucket"] not in buckets:
                buckets.append(r["bucket"])
        values = sorted({r["values"][family] for r in members if _numeric(r["values"].get(family)) is not None})
        if len(buckets) < 2 or len(values) < 2:
            continue
        buckets.sort(key=lambda b: int(b.split("-")[0].rstrip("+")))
        grid = [[float("nan")] * len(values) for _ in buckets]
        for r in members:
            if r["bucket"] in buckets and r["values"].get(family) in values and r.get(metric) is not None:
                grid[buckets.index(r["bucket"])][values.index(r["values"][family])] = r[metric]
        fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(values), 1.2 + 0.6 * len(buckets)))
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(values)), [str(v) for v in values], fontsize=8)
        ax.set_yticks(range(len(buckets)), buckets, fontsize=8)
        ax.set_xlabel(family)
        ax.set_ylabel("context length (tokens)")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax, label=LABELS.get(metric, metric))
        ax.set_title(f"{LABELS.get(metric, metric)} by context length and {family}", fontsize=9)
        fig.tight_layout()
        paths += _save(fig, directory / f"heatmap-{_safe(family)}-{metric}")
        plt.close(fig)
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return html.escape(str(v))


def write_report(rows: Sequence[dict], output: str, title: str = "gpt2-sweep.py report",
                 notes: Sequence[str] = ()) -> List[Path]:
    """The plots and ``report.html`` in ``output``; returns every path written."""
    out = Path(output)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = plot_axes(rows, plots) + plot_plane(rows, plots) + plot_heatmaps(rows, plots)
    near = closest(rows)
    ref = _reference(rows)
    shown = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    h = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
         "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
         "font-size:12px}td,th{border:1px solid #ccc;padding:2px 5px;text-align:right}"
         "th:first-child,td:first-child{text-align:left}img{max-width:100%}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>"]
    h += [f"<p>{html.escape(n)}</p>" for n in notes]
    h.append('<p>Data: <a href="results.jsonl">results.jsonl</a>, <a href="results.csv">results.csv</a>. '
             "Each value is the mean over contexts with its 95% bootstrap interval over contexts in the files; "
             "Zipf and MAUVE are of each setting's samples together.</p>")
    if near:
        h.append("<h2>Closest to the reference</h2><table><tr><th>metric</th><th>setting</th><th>value</th>"
                 "<th>reference</th></tr>")
        by_label = {r["setting"]: r for r in _settings(rows)}
        for m, label in near.items():
            name = {"all": "all metrics together (mean scaled distance)", "mauve": "MAUVE (highest)"}.get(
                m, LABELS.get(m, m))
            value = by_label[label].get(m) if m not in ("all",) else None
            h.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(label)}</td><td>{_fmt(value)}</td>"
                     f"<td>{_fmt(ref.get(m)) if ref is not None and m not in ('all', 'mauve') else '–'}</td></tr>")
        h.append("</table>")
    h.append("<h2>All settings (all contexts)</h2><table><tr><th>setting</th>" +
             "".join(f"<th>{html.escape(LABELS.get(m, m))}</th>" for m in shown) + "</tr>")
    for r in [r for r in rows if r["bucket"] == "all"]:
        h.append(f"<tr><td>{html.escape(r['setting'])}</td>" + "".join(f"<td>{_fmt(r.get(m))}</td>" for m in shown)
                 + "</tr>")
    h.append("</table><h2>Plots</h2>")
    for p in paths:
        if p.suffix == ".png":
            rel = os.path.relpath(p, out)
            svg = os.path.relpath(p.with_suffix(".svg"), out)
            h.append(f'<figure><a href="{html.escape(svg)}"><img src="{html.escape(rel)}" alt="{html.escape(p.stem)}">'
                     f'</a><figcaption>{html.escape(p.stem)} (<a href="{html.escape(svg)}">SVG</a>)</figcaption></figure>')
    h.append("</body></html>")
    report = out / "report.html"
    with atomic_file(report, "w") as f:
        f.write("\n".join(h) + "\n")
    return paths + [report]


__all__ = ["write_report", "closest", "plot_axes", "plot_plane", "plot_heatmaps", "CONTEXT_METRICS"]

"""The cross-framework diff as a picture: error per site along depth, log scale.

Draws only the small per-pair summary ``layerscope.diff`` returns (or its ``to_json()``
dict), never a trace: one point per compared pair in A's execution order, pairs beyond
tolerance in red, the first divergence marked, layers shaded so depth reads at a glance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._common import RenderError, new_figure, save

_FLOOR = 1e-12  # where exact zeros are drawn on the log axis when nothing else is drawn


def _summary(result: Any) -> Mapping[str, Any]:
    if isinstance(result, Mapping):
        summary = result
    elif hasattr(result, "to_json"):
        summary = result.to_json()
    else:
        raise RenderError(
            f"plot_diff draws a DiffResult or its to_json() dict, not a {type(result).__name__}"
        )
    if not summary.get("pairs"):
        raise RenderError("the diff compared no pairs; there is nothing to draw")
    return summary


def _value(x: Any) -> float:
    if isinstance(x, str):  # JSON writes inf / nan as strings
        return float(x)
    return math.nan if x is None else float(x)


def diff_figure(result: Any, title: str | None = None) -> Any:
    """A Figure: max abs and relative L2 error per compared pair, along A's execution order."""
    summary = _summary(result)
    pairs = summary["pairs"]
    xs = list(range(len(pairs)))
    max_abs = [_value(p["max_abs"]) for p in pairs]
    rel_l2 = [_value(p["rel_l2"]) for p in pairs]
    failed = [not p["passed"] for p in pairs]
    finite = [v for v in (*max_abs, *rel_l2) if math.isfinite(v) and v > 0]
    floor = min(finite) / 10 if finite else _FLOOR  # exact zeros sit one decade below the rest

    def shown(v: float) -> float:
        return floor if not math.isfinite(v) or v <= 0 else v

    width = min(16.0, max(7.0, 0.06 * len(pairs) + 5))
    fig = new_figure(width, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    _shade_layers(ax, pairs)
    ax.plot(xs, [shown(v) for v in max_abs], "-", color="#1f77b4", lw=1.2, label="max abs error")
    ax.plot(xs, [shown(v) for v in rel_l2], "-", color="#2ca02c", lw=1.0, alpha=0.8,
            label="relative L2 error")
    ok_x = [x for x, bad in zip(xs, failed, strict=True) if not bad]
    bad_x = [x for x, bad in zip(xs, failed, strict=True) if bad]
    ax.scatter(ok_x, [shown(max_abs[x]) for x in ok_x], s=12, color="#1f77b4", zorder=3)
    ax.scatter(bad_x, [shown(max_abs[x]) for x in bad_x], s=18, color="#d62728", zorder=4,
               label="beyond tolerance")
    atol = _value(summary.get("atol"))
    if math.isfinite(atol) and atol > 0:
        ax.axhline(atol, color="grey", ls=":", lw=1, label=f"atol {atol:g}")
    first = summary.get("first_divergence")
    if first:
        index = next(i for i, p in enumerate(pairs) if p["a"] == first["a"])
        ax.axvline(index, color="#d62728", ls="--", lw=1)
        ax.annotate(f"first divergence\n{first['a']}", (index, shown(max_abs[index])),
                    xytext=(6, -28), textcoords="offset points", fontsize=8, color="#d62728",
                    va="top")
    ax.set_yscale("log")
    ax.set_xlim(-0.5, len(pairs) - 0.5)
    ax.set_xlabel("compared site, in execution order of A (shaded bands: layers)")
    ax.set_ylabel("error (log scale; exact 0 drawn at the bottom)")
    frameworks = summary.get("frameworks") or ["A", "B"]
    ax.set_title(title or (
        f"{frameworks[0]} vs {frameworks[1]}: {summary.get('failed', sum(failed))} of "
        f"{len(pairs)} sites beyond tolerance"
    ), fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return fig


def _shade_layers(ax: Any, pairs: list[Mapping[str, Any]]) -> None:
    """Alternate bands behind runs of pairs of one layer, labelled with the layer number."""
    start = 0
    for i in range(1, len(pairs) + 1):
        if i < len(pairs) and pairs[i].get("layer") == pairs[start].get("layer"):
            continue
        layer = pairs[start].get("layer")
        if layer is not None:
            if int(layer) % 2 == 0:
                ax.axvspan(start - 0.5, i - 0.5, color="#000000", alpha=0.05, lw=0)
            ax.text((start + i - 1) / 2, 0.97, f"L{layer}", transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=7, color="grey")
        start = i


def plot_diff(result: Any, path: str | Path, title: str | None = None) -> Path:
    """Draw :func:`diff_figure` and write it as PNG, SVG or PDF (by suffix)."""
    return save(diff_figure(result, title), path)

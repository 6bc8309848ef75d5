"""A self-contained HTML report of a trace: the main views as inlined images (base64 PNG or
inline SVG), the statistics table, and the one command that redraws each view. It opens from
a file: no server, no script, nothing fetched."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.core.naming import STACKS

from ._common import RenderError, captures, check_range, dim_of, png_bytes
from ._families import attention_type
from .activations import (
    MLP_ROLES,
    _pick,
    channel_grid,
    conv_variables,
    mlp_variables,
    neuron_heatmap,
    top_tokens_figure,
)
from .attention import (
    attention_grid,
    attention_heatmap,
    attention_variables,
    head_view,
    select_attention,
)
from .attention_summary import head_summary_figure
from .hidden import (
    Unembedding,
    block_outputs,
    hidden_norms,
    hidden_trajectory,
    logit_lens,
    similarity_figure,
)
from .stats import default_variables, distributions, layer_stats


@dataclass(frozen=True)
class ReportOptions:
    """What the report shows. ``trace`` is the path printed in the commands."""

    sample: int = 0
    layer: int | None = None
    head: int = 0
    #: the one-head and head views' map in an encoder-decoder trace: the stack and
    #: self / cross-attention of ``layer``
    stack: str | None = None
    attention: str | None = None
    unembedding: Unembedding | None = None
    image_format: str = "png"  # "png" (base64) or "svg" (inline vector)
    trace: str = "TRACE"
    max_distributions: int = 12
    #: summaries over the whole trace (head statistics, PCA, top tokens, distributions) use
    #: the first ``max_samples`` samples, so a report of a huge trace stays quick
    max_samples: int = 64
    #: the statistics table reads variables in execution order up to this many bytes
    #: (uncompressed) and lists the rest as not computed
    stats_budget_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        check_range(self.sample, "sample", 0)
        check_range(self.head, "head", 0)
        if self.layer is not None:
            check_range(self.layer, "layer", 0)
        if self.stack not in (None, *STACKS):
            raise RenderError(f"stack must be one of {', '.join(STACKS)}, not {self.stack!r}")
        if self.attention not in (None, "self", "cross"):
            raise RenderError(f"attention must be 'self' or 'cross', not {self.attention!r}")
        check_range(self.max_distributions, "max_distributions", 1)
        check_range(self.max_samples, "max_samples", 1)
        check_range(self.stats_budget_bytes, "stats_budget_bytes", 0)
        if self.image_format not in ("png", "svg"):
            raise RenderError(f"image_format must be 'png' or 'svg', not {self.image_format!r}")


@dataclass
class Section:
    anchor: str
    title: str
    views: list[tuple[str, str, str]] = field(default_factory=list)  # title, command, html
    skipped: list[str] = field(default_factory=list)
    extra: str = ""


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
figure{margin:1em 0 2em 0}figcaption{font-weight:600;margin-bottom:.3em}
pre.cmd{background:#f4f4f4;padding:.4em .6em;overflow-x:auto;font-size:.85em}
img,svg{max-width:100%;height:auto}table{border-collapse:collapse;font-size:.8em}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}td:first-child{text-align:left}
tr.flag{background:#fdd}p.skip{color:#777;font-style:italic}nav a{margin-right:1em}
"""


def _embed(fig: Any, image_format: str) -> str:
    if image_format == "svg":
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", bbox_inches="tight")
        text = buffer.getvalue()
        return text[text.index("<svg"):]  # drop the XML prologue and DOCTYPE
    data = base64.b64encode(png_bytes(fig, dpi=90)).decode("ascii")
    return f'<img alt="" src="data:image/png;base64,{data}">'


def _add(section: Section, title: str, command: str, draw: Callable[[], Any],
         opts: ReportOptions) -> None:
    try:
        fig = draw()
    except RenderError as exc:
        section.skipped.append(f"{title}: {exc}")
        return
    section.views.append((title, command, _embed(fig, opts.image_format)))


def _attention(ds: Any, o: ReportOptions) -> Section:
    section = Section("attention", "Attention")
    if not attention_variables(ds):
        section.skipped.append("no attention probabilities in this trace")
        return section
    t, s = o.trace, o.sample
    layer = f" --layer {o.layer}" if o.layer is not None else ""
    layer += f" --stack {o.stack}" if o.stack else ""
    layer += f" --attention {o.attention}" if o.attention else ""
    _add(section, f"One head (head {o.head})",
         f"layerscope render attention {t}{layer} --head {o.head} --sample {s} -o head.png",
         lambda: attention_heatmap(ds, o.layer, o.head, s, stack=o.stack,
                                   attention=o.attention), o)
    cross = [n for n in attention_variables(ds) if attention_type(ds[n]) == "cross"]
    if cross:  # decoder tokens x encoder tokens: what an encoder-decoder model reads
        _add(section, f"Cross-attention (head {o.head}): {cross[0]}",
             f"layerscope render attention {t} --variable {cross[0]} --head {o.head} "
             f"--sample {s} -o cross.png",
             lambda: attention_heatmap(ds, None, o.head, s, cross[0]), o)
    _add(section, "Layers x heads", f"layerscope render attention {t} --view grid --sample {s} "
         "-o grid.png", lambda: attention_grid(ds, s), o)
    heads = _first_heads(ds, o)
    _add(section, "Head view", f"layerscope render attention {t} --view heads{layer} --head "
         f"{' '.join(map(str, heads))} --sample {s} -o heads.png",
         lambda: head_view(ds, o.layer, s, heads, stack=o.stack, attention=o.attention), o)
    _add(section, "Per-head summaries", f"layerscope render attention {t} --view summary "
         "-o summary.png", lambda: head_summary_figure(ds), o)
    return section


def _first_heads(ds: Any, o: ReportOptions, count: int = 3) -> list[int]:
    """The first ``count`` heads of the head view's map (as many as it has)."""
    try:
        name = select_attention(ds, o.layer, None, o.stack, o.attention)
    except RenderError:
        return list(range(count))  # the head view says why it cannot draw
    return list(range(min(count, int(ds[name].sizes[dim_of(ds[name], "head")]))))


def _hidden(ds: Any, o: ReportOptions) -> Section:
    section = Section("hidden", "Hidden states")
    try:
        block_outputs(ds)
        streams: list[str | None] = [None]
    except RenderError as exc:
        # an encoder-decoder model: each stack's residual stream on its own
        streams = [stack for stack in STACKS if _has_stream(ds, stack)]
        if not streams:
            section.skipped.append(str(exc))
            return section
    for stack in streams:
        _stream_views(section, ds, o, stack)
    if o.unembedding is None:
        section.skipped.append("logit lens: no unembedding given (--unembedding / --vocab)")
    return section


def _has_stream(ds: Any, stack: str) -> bool:
    try:
        block_outputs(ds, stack=stack)
    except RenderError:
        return False
    return True


def _stream_views(section: Section, ds: Any, o: ReportOptions, stack: str | None) -> None:
    t, s = o.trace, o.sample
    of = f" ({stack})" if stack else ""
    pick = f" --stack {stack}" if stack else ""
    _add(section, f"Norms{of}", f"layerscope render hidden {t} --view norms{pick} --sample {s} "
         "-o norms.png", lambda: hidden_norms(ds, s, stack), o)
    _add(section, f"Trajectories (PCA){of}", f"layerscope render hidden {t} --view trajectory"
         f"{pick} --sample {s} -o trajectory.png", lambda: hidden_trajectory(ds, s, stack), o)
    _add(section, f"Layer-to-layer similarity{of}", f"layerscope render hidden {t} --view "
         f"similarity{pick} --sample {s} -o similarity.png",
         lambda: similarity_figure(ds, s, stack=stack), o)
    unembedding = o.unembedding
    if unembedding is not None:
        _add(section, f"Logit lens{of}", f"layerscope render hidden {t} --view logit-lens"
             f"{pick} --unembedding W.npy --vocab vocab.txt --sample {s} -o lens.png",
             lambda: logit_lens(ds, unembedding, s, stack), o)


def _activations(ds: Any, o: ReportOptions) -> Section:
    section = Section("activations", "Activations")
    t, s = o.trace, o.sample
    convs = conv_variables(ds)
    if convs:
        name = convs[0]
        _add(section, f"Channel maps of {name}", f"layerscope render activations {t} --view "
             f"channels --variable {name} --sample {s} -o channels.png",
             lambda: channel_grid(ds, name, s), o)
    mlps = mlp_variables(ds)
    if mlps:
        name = _pick(ds, mlps, None, None, "MLP activation", MLP_ROLES)
        _add(section, f"Neurons x tokens: {name}", f"layerscope render activations {t} "
             f"--variable {name} --sample {s} -o neurons.png",
             lambda: neuron_heatmap(ds, name, s), o)
        _add(section, f"Top tokens per neuron: {name}", f"layerscope render activations {t} "
             f"--view top-tokens --variable {name} -o top.png",
             lambda: top_tokens_figure(ds, name), o)
    if not convs and not mlps:
        section.skipped.append("no convolution or MLP activations in this trace")
    return section


def _distributions(ds: Any, o: ReportOptions) -> Section:
    section = Section("distributions", "Distributions")
    names = default_variables(ds)[: o.max_distributions]
    _add(section, "Value histograms", f"layerscope render stats {o.trace} -o stats.png",
         lambda: distributions(ds, names), o)
    chosen, left_out, used = [], [], 0
    for name in captures(ds):
        if np.dtype(ds[name].dtype).kind not in "fiub":
            continue
        size = int(ds[name].nbytes)
        if used + size > o.stats_budget_bytes:
            left_out.append(f"{name} ({size / 2**20:.0f} MB)")
            continue
        chosen.append(name)
        used += size
    section.extra = stats_table(layer_stats(ds, chosen))
    if left_out:
        section.skipped.append(
            f"statistics not computed for {len(left_out)} variable(s) beyond the "
            f"{o.stats_budget_bytes / 2**30:.1f} GB budget: {', '.join(left_out[:10])}"
            + (" ..." if len(left_out) > 10 else "")
            + f"; run `layerscope render stats {o.trace} --variable NAME` for one of them"
        )
    return section


def stats_table(stats: Any) -> str:
    """The statistics of every variable as an HTML table; NaN/Inf rows get class ``flag``."""
    head = "".join(f"<th>{c}</th>" for c in
                   ("variable", "count", "mean", "std", "min", "max", "NaN", "Inf"))
    rows = []
    for name in stats["variable"].values:
        row = stats.sel(variable=name)
        flag = ' class="flag"' if bool(row["flagged"]) else ""
        cells = [f"<td>{html.escape(str(name))}</td>", f"<td>{int(row['count'])}</td>"]
        cells += [f"<td>{float(row[c]):.4g}</td>" for c in ("mean", "std", "min", "max")]
        cells += [f"<td>{int(row[c])}</td>" for c in ("nan", "inf")]
        rows.append(f"<tr{flag}>{''.join(cells)}</tr>")
    flagged = int(np.sum(stats["flagged"].values))
    note = (f"<p><strong>{flagged} variable(s) hold NaN or Inf</strong> (rows in red).</p>"
            if flagged else "<p>No NaN or Inf anywhere in the trace.</p>")
    return (f"{note}<details><summary>Statistics of all {len(rows)} variables</summary>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table></details>")


def _overview(ds: Any) -> str:
    attrs = ds.attrs
    model = attrs.get("model", {})
    items = [
        ("model", model.get("name") or model.get("class", "?") if isinstance(model, dict)
         else model),
        ("framework", f"{attrs.get('framework', '?')} {attrs.get('framework_version', '')}"),
        ("status", attrs.get("status", "?")), ("samples", ds.sizes.get("batch", 0)),
        ("captured variables", len(captures(ds))), ("created", attrs.get("created", "?")),
    ]
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in items)
    texts = ""
    if "input_text" in ds.variables:
        shown = ds["input_text"].isel(batch=slice(0, 20)).values
        texts = "<ol start=\"0\">" + "".join(f"<li>{html.escape(str(t))}</li>"
                                             for t in shown) + "</ol>"
    return f"<table>{rows}</table>{texts}"


def report_html(ds: Any, options: ReportOptions | None = None) -> str:
    """The report as one HTML document (str)."""
    o = options or ReportOptions()
    if o.image_format not in ("png", "svg"):
        raise RenderError(f"image_format must be 'png' or 'svg', not {o.image_format!r}")
    total = int(ds.sizes.get("batch", 0))
    summary_ds = ds
    scope = ""
    if total > o.max_samples:
        keep = max(o.max_samples, o.sample + 1)
        summary_ds = ds.isel(batch=slice(0, keep))  # lazy: nothing is read here
        scope = (f'<p class="skip">Summaries over the whole trace use samples 0..{keep - 1} '
                 f"of {total} (ReportOptions.max_samples / --max-samples).</p>")
    sections = [_attention(summary_ds, o), _hidden(summary_ds, o),
                _activations(summary_ds, o), _distributions(summary_ds, o)]
    body = []
    for section in sections:
        parts = [f'<h2 id="{section.anchor}">{section.title}</h2>']
        for title, command, image in section.views:
            parts.append(f"<figure><figcaption>{html.escape(title)}</figcaption>"
                         f'<pre class="cmd">{html.escape(command)}</pre>{image}</figure>')
        parts += [f'<p class="skip">{html.escape(reason)}</p>' for reason in section.skipped]
        parts.append(section.extra)
        body.append("\n".join(parts))
    nav = "".join(f'<a href="#{s.anchor}">{s.title}</a>' for s in sections)
    title = html.escape(f"layerscope report: {o.trace}")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{title}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{title}</h1>{_overview(ds)}{scope}<nav>{nav}</nav>{''.join(body)}</body></html>\n"
    )


def write_report(ds: Any, path: str | Path, options: ReportOptions | None = None) -> Path:
    """Write :func:`report_html` to ``path`` (UTF-8); returns the path."""
    target = Path(path)
    if not target.parent.exists():
        raise RenderError(f"cannot write {target}: folder {target.parent} does not exist")
    target.write_text(report_html(ds, options), encoding="utf-8")
    return target

"""layerscope.renderers: pictures drawn lazily from traces.

Every view takes the lazy Dataset of :func:`layerscope.open_trace`, narrows it with
``.isel`` to what it draws, and only then reads values. Views return matplotlib Figures on the
Agg canvas (no display needed; they show inline in notebooks); :func:`save` writes PNG, SVG or
PDF by suffix.
"""

from ._common import RenderError, ViewOptions, limit_read_threads, save
from .activations import (
    channel_grid,
    conv_variables,
    mlp_variables,
    neuron_heatmap,
    top_tokens,
    top_tokens_figure,
)
from .attention import (
    attention_grid,
    attention_heatmap,
    attention_variables,
    head_view,
    select_attention,
)
from .attention_summary import head_summary, head_summary_figure
from .hidden import (
    Stream,
    Unembedding,
    block_outputs,
    fit_pca,
    hidden_norms,
    hidden_trajectory,
    layer_similarity,
    logit_lens,
    logit_lens_table,
    similarity_figure,
)
from .report import ReportOptions, report_html, stats_table, write_report
from .stats import Histogram, distributions, histogram, layer_stats

__all__ = [
    "Stream",
    "limit_read_threads",
    "ReportOptions", "report_html", "stats_table", "write_report",
    "Histogram", "channel_grid", "conv_variables", "distributions", "histogram", "layer_stats",
    "mlp_variables", "neuron_heatmap", "top_tokens", "top_tokens_figure",
    "RenderError", "Unembedding", "ViewOptions", "attention_grid", "attention_heatmap",
    "attention_variables", "block_outputs", "fit_pca", "head_summary", "head_summary_figure",
    "head_view", "hidden_norms", "hidden_trajectory", "layer_similarity", "logit_lens",
    "logit_lens_table", "save", "select_attention", "similarity_figure",
]

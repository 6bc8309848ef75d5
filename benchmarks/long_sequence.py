"""Big inputs: the attention maps of one 8,192-token sequence, against the untraced run's memory.

A Llama-style model from a config (random weights; 2 layers, width 64, 2 heads, eager
attention, which makes each layer's (head, query, key) map in float32 anyway) runs one
forward pass over 8,192 tokens, untraced and traced (every attention map, the store closed),
each in a process of its own that reports its peak resident memory above its baseline.
Prints both, one layer's maps in bytes, and (traced - untraced) / one layer's maps: what the
trace costs in memory beyond what the model itself needs, in units of the largest tensor it
copies (target: at most 1.5).

    python benchmarks/long_sequence.py [--tokens 8192] [--trials 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import PeakRSS

LAYERS, HEADS, WIDTH = 2, 2, 64


def model(tokens: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=WIDTH, intermediate_size=128,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, max_position_embeddings=tokens,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def child(tokens: int, traced: bool, workdir: str) -> None:
    import torch

    import layerscope

    net = model(tokens)
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(1))
    path = Path(workdir) / f"run-{os.getpid()}.zarr"
    with torch.no_grad():
        net(input_ids=ids[:, :16])  # first allocations, outside the measurement
        start = time.perf_counter()
        with PeakRSS() as peak:
            if traced:
                with layerscope.trace(net, path, capture="*@attention"):
                    net(input_ids=ids)
            else:
                net(input_ids=ids)
        seconds = time.perf_counter() - start
    if traced:
        maps = layerscope.open_trace(path)
        names = [n for n in maps.data_vars if n.endswith("@attention")]
        assert len(names) == LAYERS and maps[names[0]].shape == (1, HEADS, tokens, tokens)
    print(json.dumps({"peak": peak.peak, "seconds": seconds}))


def run_child(tokens: int, traced: bool, workdir: Path) -> dict[str, float]:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import long_sequence as b; b.child({tokens}, {traced}, {str(workdir)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--trials", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    one_layer = HEADS * args.tokens * args.tokens * 4
    plain, traced, plain_s, traced_s = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="layerscope-long-") as tmp:
        for _ in range(args.trials):
            a = run_child(args.tokens, False, Path(tmp))
            b = run_child(args.tokens, True, Path(tmp))
            plain.append(a["peak"])
            traced.append(b["peak"])
            plain_s.append(a["seconds"])
            traced_s.append(b["seconds"])
    mb = 2 ** 20
    untraced, with_trace = statistics.median(plain), statistics.median(traced)
    print(f"{args.tokens} tokens, {LAYERS} layers x {HEADS} heads, eager attention; "
          f"one layer's maps: {one_layer / mb:.0f} MB; median of {args.trials}")
    print("| run | peak RSS above baseline MB | seconds |\n|---|---:|---:|")
    print(f"| untraced | {untraced / mb:.0f} | {statistics.median(plain_s):.1f} |")
    print(f"| traced (every attention map) | {with_trace / mb:.0f} | "
          f"{statistics.median(traced_s):.1f} |")
    print(f"\n(traced - untraced) / one layer's maps: {(with_trace - untraced) / one_layer:.2f}")


if __name__ == "__main__":
    main()

"""No noise for expected cases: tracing the demo, MiniLM, a Llama-style and a GPT-2-style model
under ``python -W error`` succeeds with nothing on stderr. Tensors without a batch axis
(position and rotary embeddings broadcast over the batch) are not warned about: the store
records them with their reason, and ``layerscope info`` lists them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import layerscope

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("PYTHONWARNINGS", None)

# Every model: all modules, every kind, two samples (so a (1, ...) tensor is not a batch).
MINILM = """
    from layerscope.loading import load

    loaded = load("minilm", "torch", None)
    layerscope.capture(loaded.model, ["A short text.", "Another, longer text than that."], OUT,
                       kinds=KINDS, tokenizer=loaded.tokenizer)
"""
# Random weights from a config; token ids stay inside the small vocabulary (GPT2Config's
# defaults point bos/eos at 50256, which transformers reports on stderr for a 128-token vocab).
LLAMA = """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    run(LlamaForCausalLM(config))
"""
GPT2 = """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    run(GPT2LMHeadModel(config))
"""
PRELUDE = """
    import sys

    import layerscope

    OUT = sys.argv[1]
    KINDS = ("output", "input", "attention")

    def run(model):
        import torch

        torch.manual_seed(0)
        ids = torch.randint(3, 128, (2, 7))
        with torch.no_grad(), layerscope.trace(model.eval(), OUT, kinds=KINDS) as active:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert active.recorder is not None and active.recorder.passes == 1
"""
SCRIPTS = {"minilm": MINILM, "llama": LLAMA, "gpt2": GPT2}

# tqdm's bar, redrawn with "\r": the one thing `layerscope trace` writes to stderr
PROGRESS = re.compile(r"tracing: +\d+%\|[^|]*\| \d+/\d+ \[[^\]]*\]")


def run_quietly(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-W", "error", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def info(path: Path) -> tuple[str, dict]:
    text = run_quietly(["-m", "layerscope", "info", str(path)], path.parent).stdout
    data = json.loads(run_quietly(["-m", "layerscope", "info", "--json", str(path)],
                                  path.parent).stdout)
    return text, data


def not_captured(text: str) -> list[str]:
    """The lines `layerscope info` prints under its "not captured" heading."""
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("not captured (")]
    assert len(heads) == 1, text
    return lines[heads[0] + 1:]


def test_the_demo_trace_is_quiet(tmp_path):
    """`make demo`'s command; its progress bar is the only thing on stderr."""
    out = tmp_path / "trace.zarr"
    done = run_quietly(["-m", "layerscope", "trace", "minilm", "-o", str(out), "--overwrite"],
                       tmp_path)
    segments = [s for s in re.split(r"[\r\n]", done.stderr) if s.strip()]
    assert segments, "the demo shows its progress bar"
    assert all(PROGRESS.fullmatch(s.strip()) for s in segments), done.stderr
    text, data = info(out)
    reason = "shape (1, 15, 384) has no leading batch axis of 4"
    assert not_captured(text) == [f"embeddings.position_embeddings@output  {reason}"]
    assert data["skipped"] == data["attrs"]["skipped"] == {
        "embeddings.position_embeddings@output": reason,
    }


@pytest.fixture(scope="module", params=sorted(SCRIPTS))
def traced(request, tmp_path_factory):
    """(model name, store path, stderr) of the model traced in a `python -W error` process."""
    folder = tmp_path_factory.mktemp(request.param)
    script = folder / "trace_model.py"
    script.write_text(textwrap.dedent(PRELUDE) + textwrap.dedent(SCRIPTS[request.param]))
    out = folder / "trace.zarr"
    done = run_quietly([str(script), str(out)], folder)
    return request.param, out, done.stderr


def test_tracing_a_model_writes_nothing_to_stderr(traced):
    name, _, stderr = traced
    assert stderr == "", f"{name}:\n{stderr}"


# what each model computes once and broadcasts over the batch (2 samples: MiniLM 9 tokens, others 7)
EXPECTED_SKIPPED = {
    "minilm": {"embeddings.position_embeddings@output": (1, 9, 384)},
    "llama": {"model.rotary_emb@output": (1, 7, 8), "model.rotary_emb@output.1": (1, 7, 8)},
    "gpt2": {"transformer.wpe@output": (1, 7, 32)},
}


def test_broadcast_sites_are_recorded_and_listed_by_info(traced):
    name, out, _ = traced
    ds = layerscope.open_trace(out)
    recorded = ds.attrs["skipped"]
    for site, shape in EXPECTED_SKIPPED[name].items():
        assert recorded.get(site) == f"shape {shape} has no leading batch axis of 2", recorded
        assert site not in ds
    assert all(re.fullmatch(r"shape \(.*\) has no leading batch axis of 2", r)
               for r in recorded.values()), recorded
    text, data = info(out)
    assert data["skipped"] == recorded
    assert not_captured(text) == [
        f"{site:<{max(map(len, recorded))}}  {reason}" for site, reason in recorded.items()
    ]
    assert len(layerscope.captured_names(ds)) > 10  # every module was traced, not only a few

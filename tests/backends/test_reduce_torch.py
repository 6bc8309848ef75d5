"""Reductions and token positions in PyTorch, on GPT-2 and Llama (random weights, eager
attention) with left- and right-padded batches: every stored reduction equals the same
reduction written out in NumPy over what the blocks themselves returned (seen by plain forward
hooks, outside layerscope) and over the attention maps the model returns; only what was asked
for is stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import layerscope
from layerscope.backends import _torch_reduce
from layerscope.cli import main
from layerscope.core import CaptureError
from tests import reduce_reference as ref
from tests.conftest import load_minilm

LAYERS = 2
VOCAB = 60


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=32,
                        attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def padded(side: str, batch: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    """Token ids of rows 7, 4 and 2 tokens long, padded on ``side``."""
    ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, real in enumerate((7, 4, 2)[:batch]):
        if side == "left":
            mask[row, length - real:] = 1
        else:
            mask[row, :real] = 1
    return {"input_ids": ids, "attention_mask": mask}


def own_outputs(model: torch.nn.Module, sites: list[str], inputs: dict[str, Any]
                ) -> tuple[dict[str, np.ndarray], Any]:
    """What the modules at ``sites`` return (their first tensor), by plain forward hooks, and
    the model's own output with its attention maps."""
    seen: dict[str, np.ndarray] = {}
    modules = dict(model.named_modules())
    handles = [modules[site].register_forward_hook(
        lambda m, a, out, s=site: seen.__setitem__(
            s, (out[0] if isinstance(out, tuple) else out).detach().float().numpy().copy()))
        for site in sites]
    try:
        with torch.no_grad():
            output = model(**inputs, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    return seen, output


BLOCKS = {"gpt2": (gpt2, "transformer.h.{}", "transformer.h.*.attn"),
          "llama": (llama, "model.layers.{}", "model.layers.*.self_attn")}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_reductions_equal_numpy_over_the_blocks_own_outputs(tmp_path: Path, name: str,
                                                             side: str) -> None:
    build, block, attention = BLOCKS[name]
    model, inputs = build(), padded(side)
    sites = [block.format(i) for i in range(LAYERS)]
    own, output = own_outputs(model, sites, inputs)
    mask = inputs["attention_mask"].numpy()
    path = tmp_path / "r.zarr"
    with layerscope.trace(model, path, [
            block.format("?") + "@output:last,output:first,output:mean,output:norm,"
            "output:topk(5),output:slice(0:3),output:slice(-3:),output:mask",
            attention + "@attention:last"]), torch.no_grad():
        model(**inputs)
    ds = layerscope.open_trace(path)
    names = set(layerscope.captured_names(ds))
    assert not any(n.endswith(("@output", "@attention")) for n in names), names  # none whole
    np.testing.assert_array_equal(ds["token_mask"].values, mask.astype(bool))
    for layer, site in enumerate(sites):
        x = own[site]
        assert ds[f"{site}@output:last(token)"].dims == ("batch", "hidden")
        np.testing.assert_array_equal(ds[f"{site}@output:last(token)"].values, ref.last(x, mask))
        np.testing.assert_array_equal(ds[f"{site}@output:first(token)"].values,
                                      ref.first(x, mask))
        np.testing.assert_allclose(ds[f"{site}@output:mean(token)"].values, ref.mean(x, mask),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ds[f"{site}@output:norm(hidden)"].values, ref.norm(x),
                                   rtol=1e-5)
        values, index = ref.topk(x, 5)
        assert ds[f"{site}@output:topk(hidden,5)"].dims == ("batch", "token", "k")
        np.testing.assert_array_equal(ds[f"{site}@output:topk(hidden,5)"].values, values)
        np.testing.assert_array_equal(ds[f"{site}@output:topk(hidden,5):index"].values, index)
        for start, stop, text in ((0, 3, "0:3"), (-3, None, "-3:")):
            stored = ds[f"{site}@output:slice(token,{text})"]
            assert stored.dims == ("batch", "token_slice", "hidden")
            np.testing.assert_array_equal(stored.values, ref.positions(x, mask, start, stop))
        np.testing.assert_array_equal(ds[f"{site}@output:mask(token)"].values,
                                      ref.masked(x, mask).astype(np.float32))
        maps = output.attentions[layer].numpy()
        stored = ds[f"{attention.replace('*', str(layer))}@attention:last(query)"]
        assert stored.dims == ("batch", "head", "key")
        np.testing.assert_array_equal(stored.values, ref.last(maps, mask, axis=2))
        assert stored.attrs["reduction"] == "last(query)" and stored.attrs["reduced_kind"] == \
            "attention"


def test_capture_keywords_reduce_every_block_and_left_padding_picks_the_last_token(
        tmp_path: Path) -> None:
    """``positions="last", reduce=...`` through ``layerscope.capture``, in bfloat16: the last
    real token of a left-padded batch is the last position; means are in float32."""
    model = llama().to(torch.bfloat16)
    inputs = padded("left")
    sites = [f"model.layers.{i}" for i in range(LAYERS)]
    own, _ = own_outputs(model, sites, inputs)  # bfloat16 outputs, widened exactly
    ds = layerscope.capture(model, [inputs], tmp_path / "k.zarr", "model.layers.?@output",
                            positions="last", reduce=["norm", "topk(4)"])
    mask = inputs["attention_mask"].numpy()
    assert ds.attrs["capture"]["positions"] == "last"
    assert sorted(layerscope.captured_names(ds)) == sorted(
        f"{s}@output:last(token):{r}" for s in sites
        for r in ("norm(hidden)", "topk(hidden,4)", "topk(hidden,4):index"))
    for site in sites:
        last = own[site][:, -1]  # left padding: every sample's last token is the last position
        np.testing.assert_array_equal(last, ref.last(own[site], mask))
        norm = ds[f"{site}@output:last(token):norm(hidden)"]
        assert norm.dtype == np.float32 and norm.dims == ("batch",)
        np.testing.assert_allclose(norm.values, ref.norm(last), rtol=1e-6)
        values, index = ref.topk(last, 4)
        np.testing.assert_array_equal(ds[f"{site}@output:last(token):topk(hidden,4)"].values,
                                      values)
        np.testing.assert_array_equal(
            ds[f"{site}@output:last(token):topk(hidden,4):index"].values, index)


def test_the_cli_stores_only_the_reductions_it_is_asked_for(tmp_path: Path,
                                                            minilm_folder: Path,
                                                            minilm_tokenizer: Any) -> None:
    path = tmp_path / "cli.zarr"
    texts = ["a short text", "a text with a good many more tokens than the first one"]
    argv = ["trace", "minilm", "-o", str(path), "--capture", "encoder.layer.*.output",
            "--kinds", "output", "--positions", "last", "--reduce", "mean", "--reduce", "norm",
            "--no-progress"]
    for text in texts:
        argv += ["--text", text]
    assert main(argv) == 0
    ds = layerscope.open_trace(path)
    names = layerscope.captured_names(ds)
    assert names and all(n.endswith(":last(token):norm(hidden)") for n in names), names
    assert "encoder.layer.0.output@output:last:mean" in ds.attrs["skipped"]  # no token axis
    model = load_minilm(minilm_folder, "eager")
    inputs = minilm_tokenizer(texts, padding=True, return_tensors="pt")
    site = "encoder.layer.5.output"
    own, _ = own_outputs(model, [site], dict(inputs))
    mask = inputs["attention_mask"].numpy()
    np.testing.assert_allclose(ds[f"{site}@output:last(token):norm(hidden)"].values,
                               ref.norm(ref.last(own[site], mask)), rtol=1e-5)


def test_generate_with_reductions_is_refused(tmp_path: Path) -> None:
    model = gpt2()
    inputs = padded("left", batch=1)
    with pytest.raises(CaptureError, match="generate"), torch.no_grad(), \
            layerscope.trace(model, tmp_path / "g.zarr", "transformer.h.*@output:last"):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_a_reduction_that_fails_aborts_the_trace_and_keeps_what_was_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error inside a reduction, in the second pass: the error reaches the caller, the
    store ends aborted with the first batch intact."""
    model, inputs = gpt2(), padded("right")
    path = tmp_path / "f.zarr"
    own, _ = own_outputs(model, ["transformer.h.1"], inputs)
    with pytest.raises(RuntimeError, match="device lost"), torch.no_grad(), \
            layerscope.trace(model, path, "transformer.h.?@output:last"):
        model(**inputs)

        def broken(*args: Any) -> Any:
            raise RuntimeError("device lost")

        monkeypatch.setattr(_torch_reduce.OPS, "take", broken)
        model(**inputs)
    with pytest.warns(UserWarning):
        ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == "aborted" and ds.attrs["committed_batches"] == 1
    np.testing.assert_array_equal(ds["transformer.h.1@output:last(token)"].values,
                                  ref.last(own["transformer.h.1"],
                                           inputs["attention_mask"].numpy()))


def test_a_trace_whose_every_tensor_is_skipped_says_so(tmp_path: Path) -> None:
    """A token choice or token reduction on a model without token axes (a CNN) skips every
    tensor: the trace warns that nothing was captured, naming a reason, instead of leaving
    a store of labels alone without a word, and so does an estimate of such a trace, once,
    of its path; a reduction that applies warns of nothing."""
    import warnings

    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 10)).eval()
    x = torch.randn(2, 1, 8, 8)
    for asked in ({"positions": "last"}, {"reduce": "mean"}):
        path = tmp_path / f"{next(iter(asked.values()))}.zarr"
        with pytest.warns(UserWarning, match=r"nothing was captured .* in 2 passes.*"
                                             r"no token axis in dims"):
            with torch.no_grad(), layerscope.trace(cnn, path, **asked):
                cnn(x)
                cnn(x)
        ds = layerscope.open_trace(path)
        assert not ds.data_vars and len(ds.attrs["skipped"]) == 5
    # the estimate's probe traces into memory: it names the path the trace would write
    with pytest.warns(UserWarning) as said:
        layerscope.estimate(cnn, x, 8, path=tmp_path / "e.zarr", positions="last")
    assert [str(w.message).split(":")[0] for w in said] == \
        [f"a trace into {tmp_path / 'e.zarr'} would capture nothing"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), layerscope.trace(cnn, tmp_path / "norm.zarr", reduce="norm"):
            cnn(x)
    assert len(layerscope.open_trace(tmp_path / "norm.zarr").data_vars) == 5


def test_positions_without_a_mask_are_the_same_positions_of_every_sample(tmp_path: Path):
    """No mask: every position is real, and positions within the pass are a plain slice of
    each block's output (no gather on the device), copied at hook time: an in-place op of
    the model right after the hook does not reach them. A slice longer than the pass is
    filled past it."""
    model = llama()
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    sites = [f"model.layers.{i}" for i in range(LAYERS)]
    modules = dict(model.named_modules())
    seen: dict[str, np.ndarray] = {}

    def halve(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        out.mul_(0.5)  # in place, after every hook registered before this one

    handles = [modules[site].register_forward_hook(
        lambda m, a, out, s=site: seen.__setitem__(s, out.detach().numpy().copy()))
        for site in sites]
    handles += [modules[site].register_forward_hook(halve) for site in sites]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()

    path = tmp_path / "p.zarr"
    specs = "output:last,output:first,output:slice(1:3),output:slice(-2:),output:slice(0:9)"
    with layerscope.trace(model, path, f"model.layers.?@{specs}"), torch.no_grad():
        handles = [modules[site].register_forward_hook(halve) for site in sites]
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    ds = layerscope.open_trace(path)
    for site in sites:
        x = seen[site]
        np.testing.assert_array_equal(ds[f"{site}@output:last(token)"].values, x[:, -1])
        np.testing.assert_array_equal(ds[f"{site}@output:first(token)"].values, x[:, 0])
        np.testing.assert_array_equal(ds[f"{site}@output:slice(token,1:3)"].values, x[:, 1:3])
        np.testing.assert_array_equal(ds[f"{site}@output:slice(token,-2:)"].values, x[:, -2:])
        longer = ds[f"{site}@output:slice(token,0:9)"].values
        np.testing.assert_array_equal(longer[:, :7], x)
        assert np.isnan(longer[:, 7:]).all()
        assert ds[f"{site}@output:last(token)"].attrs["token_mask_used"] is False

"""One model in three frameworks: all-MiniLM-L6-v2 in PyTorch, Keras (keras-hub) and JAX (the
Flax NNX port in examples/minilm), diffed through the shipped name maps; and a tiny CNN in
PyTorch (NCHW) and Keras (NHWC) lined up by dim names."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import layerscope
from layerscope.cli import main as cli_main
from layerscope.core.diff import diff

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minilm"
TEXTS = ["The cat sat on the mat.", "Hello world"]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare():
    return _load("minilm_compare", EXAMPLE / "compare.py")


@pytest.fixture(scope="module")
def flax_bert():
    return _load("flax_bert", EXAMPLE / "flax_bert.py")


# -- the Flax port on its own ----------------------------------------------------------------


def test_flax_port_matches_transformers_bert(flax_bert, minilm_folder, minilm_tokenizer):
    import torch
    from transformers import AutoModel

    batch = minilm_tokenizer(TEXTS, padding=True, return_tensors="np")
    ours = flax_bert.FlaxBertModel.from_pretrained(minilm_folder)(**batch)
    reference = AutoModel.from_pretrained(str(minilm_folder)).eval()
    with torch.no_grad():
        theirs = reference(**{k: torch.from_numpy(v) for k, v in batch.items()})
    for key in ("last_hidden_state", "pooler_output"):
        got, want = np.asarray(ours[key]), getattr(theirs, key).numpy()
        assert got.dtype == np.float32 and got.shape == want.shape
        # float32 round-off through six layers stays under 1e-4 (measured: 5e-5 at most);
        # a wrong weight, layout or GELU flavour is 1e-3 and more
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_flax_port_rejects_a_mismatched_checkpoint(flax_bert):
    config = flax_bert.BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
                                  intermediate_size=16, vocab_size=10, max_position_embeddings=4)
    model = flax_bert.FlaxBertModel(config)
    weights = {"embeddings.word_embeddings.weight": np.zeros((10, 9), np.float32)}
    with pytest.raises(ValueError, match="does not fit"):
        flax_bert.load_hf_weights(model, weights)


# -- three frameworks, one command ------------------------------------------------------------


@pytest.fixture(scope="module")
def summaries(compare, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm-compare")
    return out, compare.run(out, TEXTS, plot=True, quiet=True)


def _complete(summary: dict) -> None:
    """Every map rule paired a variable in every layer: no capture went missing."""
    for note in summary["notes"]:
        assert "paired nothing" not in note and "target B lacks" not in note, note
    assert not any("different token ids" in n for n in summary["notes"])


def _pairs_of(summary: dict) -> dict[str, dict]:
    return {p["a"]: p for p in summary["pairs"]}


def test_torch_and_flax_agree_at_every_site(summaries):
    out, all_ = summaries
    summary = all_["torch-vs-flax"]
    _complete(summary)
    assert summary["passed"] and summary["first_divergence"] is None
    pairs = _pairs_of(summary)
    for layer in range(6):  # attention maps and block outputs of every layer were compared
        assert f"encoder.layer.{layer}.attention.self@attention" in pairs
        assert f"encoder.layer.{layer}@output" in pairs
    assert pairs["embeddings.word_embeddings@output"]["max_abs"] == 0.0  # a lookup: exact
    assert cli_main(["diff", str(out / "torch.zarr"), str(out / "flax.zarr"),
                     "--map", str(EXAMPLE / "maps" / "torch_flax.json")]) == 0


@pytest.mark.parametrize("key, site", [
    ("torch-vs-keras", "encoder.layer.0.intermediate@output"),
    ("flax-vs-keras", "encoder.layer.0.intermediate@output"),
])
def test_keras_hub_parts_at_the_first_gelu(summaries, key, site):
    """keras-hub's BERT uses the tanh-approximate GELU; the checkpoint's config asks for erf."""
    out, all_ = summaries
    summary = all_[key]
    _complete(summary)
    first = summary["first_divergence"]
    assert first is not None and first["a"] == site
    assert first["b"] == "transformer_layers.0.feedforward_intermediate_dense@output"
    # everything before the activation agrees; the tanh approximation differs by < 1e-3
    before = [p for p in summary["pairs"] if p["order"] < first["order"]]
    assert len(before) >= 9 and all(p["passed"] for p in before)
    assert 1e-4 < first["max_abs"] < 1e-3
    a, b = key.split("-vs-")
    maps = {"torch": "torch_keras.json", "flax": "flax_keras.json"}
    assert cli_main(["diff", str(out / f"{a}.zarr"), str(out / f"{b}.zarr"),
                     "--map", str(EXAMPLE / "maps" / maps[a])]) == 1


def test_keras_hub_with_the_erf_gelu_agrees_with_torch(summaries):
    """The control: swap the activation, and every site agrees to float32 round-off."""
    _, all_ = summaries
    summary = all_["torch-vs-keras-erf"]
    _complete(summary)
    assert summary["passed"], summary["first_divergence"]
    assert max(p["rel_l2"] for p in summary["pairs"]) < 1e-5


def test_compare_writes_summary_and_plots(summaries):
    out, all_ = summaries
    assert json.loads((out / "summary.json").read_text()).keys() == all_.keys()
    for key in all_:
        assert (out / f"{key}.png").read_bytes()[:4] == b"\x89PNG"


# -- a tiny CNN: PyTorch NCHW vs Keras NHWC -----------------------------------------------------


def _cnn_pair(swap_channels: bool = False):
    import keras
    import torch
    from torch import nn

    torch.manual_seed(0)
    t_model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2),
    ).eval()
    k_model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, padding="same"), keras.layers.ReLU(),
        keras.layers.Conv2D(5, 3), keras.layers.ReLU(), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])

    def conv(layer):  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
        return [layer.weight.detach().numpy().transpose(2, 3, 1, 0), layer.bias.detach().numpy()]

    first = conv(t_model[0])
    if swap_channels:  # a conversion bug: two output channels exchanged
        first = [first[0][..., [1, 0, 2, 3]], first[1][[1, 0, 2, 3]]]
    k_model.layers[0].set_weights(first)
    k_model.layers[2].set_weights(conv(t_model[2]))
    k_model.layers[5].set_weights([t_model[6].weight.detach().numpy().T,
                                   t_model[6].bias.detach().numpy()])
    return t_model, k_model


def test_tiny_cnn_nchw_and_nhwc_agree_after_alignment_by_dim_names(tmp_path):
    import torch

    t_model, k_model = _cnn_pair()
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    a = layerscope.capture(t_model, torch.from_numpy(x), tmp_path / "torch.zarr", mode="w")
    b = layerscope.capture(k_model, x.transpose(0, 2, 3, 1).copy(), tmp_path / "keras.zarr",
                           mode="w")
    assert a["0@output"].dims == ("batch", "channel", "height", "width")
    first_keras = layerscope.captured_names(b)[0]  # Keras numbers layer names globally
    assert list(b[first_keras].attrs["roles"]) == ["batch", "height", "width", "channel"]
    result = diff(tmp_path / "torch.zarr", tmp_path / "keras.zarr")  # automatic pairing
    assert result.passed and result.frameworks == ("torch", "keras/tensorflow")
    convs = [p for p in result.pairs if "transposed" in p.note]
    assert len(convs) == 4  # two convolutions and two ReLUs, channels-last -> channels-first
    assert all(p.max_abs < 1e-5 for p in result.pairs)
    assert len(result.pairs) >= 6

    _, swapped = _cnn_pair(swap_channels=True)
    layerscope.capture(swapped, x.transpose(0, 2, 3, 1).copy(), tmp_path / "bad.zarr", mode="w")
    bad = diff(tmp_path / "torch.zarr", tmp_path / "bad.zarr")
    assert bad.first_divergence is not None and bad.first_divergence.a == "0@output"

"""Shared checks for encoder-decoder models (T5, BART, Whisper): the trace holds the model's own
attentions and hidden states, each axis labeled by the stack whose positions it indexes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import layerscope
from layerscope.core.naming import roles_of, token_axis_of

from ._zoo import attention_variables, captures

ENCODER_SELF = ("batch", "head", "query", "key")
DECODER_SELF = ("batch", "head", "decoder_query", "decoder_key")
CROSS = ("batch", "head", "decoder_query", "key")
ENCODER_STATES = ("batch", "token", "hidden")
DECODER_STATES = ("batch", "decoder_token", "hidden")


@dataclass
class Sites:
    """Where one family keeps its attentions and layers, ``{i}`` for the layer."""

    encoder_self: str
    decoder_self: str
    cross: str
    encoder_layer: str
    decoder_layer: str
    # cross-attention key / value projections: they index the encoder's positions
    cross_key_value: tuple[str, ...] = field(default_factory=tuple)


#: BART and Whisper (transformers' BART-style encoder-decoders) name their modules alike
BART_STYLE_SITES = Sites(
    encoder_self="model.encoder.layers.{i}.self_attn",
    decoder_self="model.decoder.layers.{i}.self_attn",
    cross="model.decoder.layers.{i}.encoder_attn",
    encoder_layer="model.encoder.layers.{i}",
    decoder_layer="model.decoder.layers.{i}",
    cross_key_value=("model.decoder.layers.{i}.encoder_attn.k_proj",
                     "model.decoder.layers.{i}.encoder_attn.v_proj"),
)


def run_reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
    """The model's own attentions and hidden states, under eager attention."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        return model(**inputs, output_attentions=True, output_hidden_states=True)


def trace(model: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Any,
          implementation: str, monkeypatch: Any) -> tuple[Any, Any, int]:
    """Trace one call under ``implementation`` (``eager`` or ``sdpa``): the opened trace, what
    the model returned, and how many times the fused kernel ran (SDPA: the maps were
    recomputed, not returned)."""
    model.set_attn_implementation(implementation)
    fused: list[int] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counted(*args: Any, **kwargs: Any) -> Any:
        fused.append(1)
        return original(*args, **kwargs)

    eager = implementation == "eager"
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
        with layerscope.trace(model, path, kinds=["output", "attention"]), torch.no_grad():
            out = model(**inputs, output_attentions=eager, output_hidden_states=True)
    return layerscope.open_trace(path), out, len(fused)


def assert_encoder_decoder_trace(ds: Any, out: Any, reference: Any, sites: Sites, layers: int,
                                 *, source: int, target: int, exact: bool,
                                 token_ids: Any = None, decoder_token_ids: Any = None) -> None:
    """Every attention map is the model's own (``reference``: under eager attention; bit for
    bit when ``exact``, else recomputed, to 1e-6), with dims by name and attributes; layer
    outputs and logits are those of the traced call (``out``), bit for bit; every token axis
    is labeled by its own stack."""
    compare: Callable[..., None] = np.testing.assert_array_equal if exact else \
        _close_to_a_millionth
    expected = {}
    for i in range(layers):
        expected[sites.encoder_self.format(i=i)] = (
            reference.encoder_attentions[i], ENCODER_SELF, "encoder", i, "self")
        expected[sites.decoder_self.format(i=i)] = (
            reference.decoder_attentions[i], DECODER_SELF, "decoder", i, "self")
        expected[sites.cross.format(i=i)] = (
            reference.cross_attentions[i], CROSS, "decoder", i, "cross")
    stored = attention_variables(ds)
    assert set(stored) == {f"{site}@attention" for site in expected}, sorted(stored)
    for site, (values, dims, stack, layer, kind) in expected.items():
        var = stored[f"{site}@attention"]
        assert var.dims == dims, (site, var.dims)
        assert roles_of(var) == ENCODER_SELF, (site, roles_of(var))
        assert (var.attrs["stack"], var.attrs["layer"], var.attrs["attention"]) == \
            (stack, layer, kind), (site, var.attrs)
        compare(var.values, values.numpy(), err_msg=site)

    # the last layer's output is taken before the stack's final norm: compare the others
    for stack, template, states, dims in (
            ("encoder", sites.encoder_layer, out.encoder_hidden_states, ENCODER_STATES),
            ("decoder", sites.decoder_layer, out.decoder_hidden_states, DECODER_STATES)):
        assert len(states) == layers + 1
        for i in range(layers):
            var = ds[f"{template.format(i=i)}@output"]
            assert var.dims == dims, (template, i, var.dims)
            assert (var.attrs["stack"], var.attrs["layer"]) == (stack, i), var.attrs
            if i < layers - 1:
                np.testing.assert_array_equal(var.values, states[i + 1].numpy(),
                                              err_msg=f"{stack} layer {i}")
        for i, value in enumerate(states):
            var = ds[f"root@output.{stack}_hidden_states.{i}"]
            assert var.dims == dims, (stack, i, var.dims)
            np.testing.assert_array_equal(var.values, value.numpy())

    for site in sites.cross_key_value:  # decoder modules, encoder positions
        for i in range(layers):
            var = ds[f"{site.format(i=i)}@output"]
            assert var.dims == ENCODER_STATES, (site, i, var.dims)
            assert var.attrs["stack"] == "decoder", var.attrs

    logits = ds["root@output.logits"]
    assert logits.dims[:2] == ("batch", "decoder_token"), logits.dims
    assert roles_of(logits)[-1] not in ("hidden", "neuron"), roles_of(logits)
    np.testing.assert_array_equal(logits.values, out.logits.numpy())

    if token_ids is not None:
        np.testing.assert_array_equal(ds["token_id"].values, np.asarray(token_ids))
        assert ds["token_id"].dims == ("batch", "token")
    else:
        assert "token_id" not in ds.variables
    np.testing.assert_array_equal(ds["decoder_token_id"].values, np.asarray(decoder_token_ids))
    assert ds["decoder_token_id"].dims == ("batch", "decoder_token")
    assert_token_axes_by_stack(ds, source, target)


def _close_to_a_millionth(actual: Any, desired: Any, err_msg: str = "") -> None:
    np.testing.assert_allclose(actual, desired, rtol=0, atol=1e-6, err_msg=err_msg)


def assert_token_axes_by_stack(ds: Any, source: int, target: int) -> None:
    """With a source and a target of different lengths, a token axis labeled for the wrong
    stack shows as a wrong size: encoder axes (``token``, ``query``, ``key``) are ``source``
    long, decoder ones (``decoder_*``) ``target`` long."""
    assert source != target
    for name, var in captures(ds).items():
        for dim, size in var.sizes.items():
            axis = token_axis_of(str(dim))
            if axis == "token":
                assert size == source, (name, dim, size)
            elif axis == "decoder_token":
                assert size == target, (name, dim, size)

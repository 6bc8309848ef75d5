"""An LSTM language model (Embedding -> nn.LSTM -> Linear), batch-first and with a time-major
LSTM inside: the LSTM's states are (batch, token, hidden) either way, its final states
(batch, rnn_layer, hidden), the logits (batch, token, <vocabulary>) with no feature role, each
equal to the layer's own output, at batch 1 and 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import layerscope
from layerscope.core.errors import CaptureError
from layerscope.core.naming import roles_of

from ._zoo import assert_no_image_roles

VOCAB, WIDTH, STATE, LENGTH = 50, 16, 24, 6


class LanguageModel(nn.Module):
    """Token ids (batch, token) in, logits out; ``batch_first=False`` runs a time-major LSTM."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.lstm = nn.LSTM(WIDTH, STATE, num_layers=2, batch_first=batch_first)
        self.decoder = nn.Linear(STATE, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (token, batch, width)
        states, _ = self.lstm(x)
        if not self.batch_first:
            states = states.transpose(0, 1)
        return self.decoder(states)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "time-major"])
@pytest.mark.parametrize("batch", [1, 3])
def test_lstm_language_model(tmp_path, batch, batch_first):
    torch.manual_seed(0)
    model = LanguageModel(batch_first).eval()
    ids = torch.randint(0, VOCAB, (batch, LENGTH), generator=torch.Generator().manual_seed(batch))
    own: dict[str, object] = {}
    handles = [getattr(model, name).register_forward_hook(
        lambda m, a, o, name=name: own.setdefault(name, o)) for name in ("embed", "lstm")]
    path = tmp_path / "lstm.zarr"
    try:
        with layerscope.trace(model, path), torch.no_grad():
            logits = model(ids)
    finally:
        for handle in handles:
            handle.remove()
    ds = layerscope.open_trace(path)

    assert ds.sizes["batch"] == batch
    embedded = ds["embed@output"]
    assert roles_of(embedded) == ("batch", "token", "hidden")
    np.testing.assert_array_equal(embedded.values, own["embed"].numpy())
    np.testing.assert_array_equal(ds["token_id"].values, ids.numpy())

    states, (h_n, c_n) = own["lstm"]
    if not batch_first:
        states = states.transpose(0, 1)  # stored batch first
    var = ds["lstm@output"]  # the first element of the tuple is the output itself
    assert roles_of(var) == ("batch", "token", "hidden") and var.shape == (batch, LENGTH, STATE)
    np.testing.assert_array_equal(var.values, states.numpy())
    for part, value in (("1.0", h_n), ("1.1", c_n)):  # (layers, batch, state) stored batch first
        var = ds[f"lstm@output.{part}"]
        assert roles_of(var) == ("batch", "rnn_layer", "hidden"), (part, roles_of(var))
        np.testing.assert_array_equal(var.values, value.transpose(0, 1).numpy(), err_msg=part)

    for name in ("decoder@output", "root@output"):
        var = ds[name]
        roles = roles_of(var)
        assert roles[:2] == ("batch", "token") and roles[2] not in ("hidden", "neuron"), \
            (name, roles)
        # an output layer called decoder in a model without an encoder stack is no stack
        assert var.dims[1] == "token" and "stack" not in var.attrs, (name, var.dims)
        np.testing.assert_array_equal(var.values, logits.numpy(), err_msg=name)
    assert_no_image_roles(ds)


class TimeMajorLanguageModel(nn.Module):
    """PyTorch's word language model: ids (token, batch) straight into a time-major LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.lstm = nn.LSTM(WIDTH, STATE)
        self.head = nn.Linear(STATE, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(ids))[0])


def test_time_major_ids_are_refused_not_stored_as_samples(tmp_path):
    """Ids (token, batch) would be read as LENGTH samples of 3 tokens: the pass stops with an
    error that says so, and nothing is committed."""
    model = TimeMajorLanguageModel().eval()
    ids = torch.randint(0, VOCAB, (LENGTH, 3), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "time-major.zarr"
    refusal = r"time-major layer 'lstm' \(batch_first=False\) as \(token, batch\)"
    with pytest.raises(CaptureError, match=refusal):
        with layerscope.trace(model, path), torch.no_grad():
            model(ids)
    with pytest.warns(UserWarning, match="aborted"):
        ds = layerscope.open_trace(path)
    assert ds.attrs["status"] == "aborted" and ds.attrs["committed_samples"] == 0


class WordLanguageModel(nn.Module):
    """PyTorch's word language model names its embedding ``encoder`` and its output layer
    ``decoder``: no encoder-decoder model for all that."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(VOCAB, WIDTH)
        self.rnn = nn.LSTM(WIDTH, STATE, batch_first=True)
        self.decoder = nn.Linear(STATE, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.rnn(self.encoder(ids))[0])


def test_modules_called_encoder_and_decoder_are_no_stacks(tmp_path):
    model = WordLanguageModel().eval()
    ids = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    path = tmp_path / "word-lm.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        model(ids)
    ds = layerscope.open_trace(path)
    for name in ("encoder@output", "rnn@output", "decoder@output"):
        var = ds[name]
        assert var.dims[:2] == ("batch", "token") and "stack" not in var.attrs, (name, var.dims)
    assert "decoder_token_id" not in ds.variables


class TimeMajorAttention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


def test_time_major_attention_input_is_refused_and_batch_first_weights_are_attention(tmp_path):
    """nn.MultiheadAttention handed (token, batch, width) by the root is refused like the RNN;
    batch-first, the head-averaged weights it returns are (batch, query, key), not states."""
    model = TimeMajorAttention(batch_first=False).eval()
    with pytest.raises(CaptureError, match=r"time-major layer 'attn'"):
        with layerscope.trace(model, tmp_path / "tm.zarr"), torch.no_grad():
            model(torch.rand(LENGTH, 3, WIDTH))

    model = TimeMajorAttention(batch_first=True).eval()
    x = torch.rand(3, LENGTH, WIDTH)
    path = tmp_path / "bf.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        model(x)
    with torch.no_grad():
        _, averaged = model.attn(x, x, x)
        _, per_head = model.attn(x, x, x, average_attn_weights=False)
    ds = layerscope.open_trace(path)
    assert roles_of(ds["attn@output.1"]) == ("batch", "query", "key")
    np.testing.assert_array_equal(ds["attn@output.1"].values, averaged.numpy())
    assert roles_of(ds["attn@attention"]) == ("batch", "head", "query", "key")
    np.testing.assert_allclose(ds["attn@attention"].values, per_head.numpy(), rtol=0, atol=1e-6)

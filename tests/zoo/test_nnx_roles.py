"""Role rules of the JAX backend on abstract Flax modules (parameters as shapes only, nothing
computed): what each module's output is labeled, whether an attention map is self- or
cross-attention, and how an encoder-decoder's two sides are named."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def _abstract(make: Any) -> Any:
    """A Flax module with its parameters as shapes only: nothing is computed."""
    return nnx.eval_shape(make)


class OwnModule(nnx.Module):
    """Any module of the user's own that returns a 4-d array."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def test_image_roles_only_where_a_module_or_map_says_so() -> None:
    from layerscope.backends._jax_dims import Context, roles_for

    image = ("batch", "height", "width", "channel")
    conv = _abstract(lambda: nnx.Conv(3, 5, (3, 3), rngs=nnx.Rngs(0)))
    conv1d = _abstract(lambda: nnx.Conv(3, 5, (3,), rngs=nnx.Rngs(0)))
    assert roles_for(conv, "output", (2, 8, 6, 5), None) == image
    assert roles_for(conv1d, "output", (2, 8, 5), None) == ("batch", "width", "channel")
    assert roles_for(conv, "output", (8, 6, 5), None) == ("batch", "axis1", "axis2")

    norm = _abstract(lambda: nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    heads = ("batch", "token", "head", "axis3")
    # a query/key norm over per-head projections keeps their roles; alone it is unsure
    assert roles_for(norm, "output", (2, 5, 3, 4), None, Context(input_roles=heads)) == heads
    assert roles_for(norm, "output", (2, 5, 3, 4), None) == ("batch", "axis1", "axis2", "axis3")
    batch_norm = _abstract(lambda: nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    assert roles_for(batch_norm, "output", (2, 5, 3, 4), None) == image

    # a module of the user's own: an image only beside or around a map of that channel count
    custom = OwnModule()
    assert roles_for(custom, "output", (2, 5, 3, 4), None) == ("batch", "axis1", "axis2", "axis3")
    assert roles_for(custom, "output", (2, 5, 3, 4), None, Context(image=(4, 4))) == image
    assert roles_for(custom, "output", (2, 5, 3, 4), None, Context(image=(4, 7)))[1] == "axis1"
    assert roles_for(custom, "output", (2, 5, 3, 4), None,
                     Context(inherited=heads)) == heads  # the same array, handed on

    general = _abstract(lambda: nnx.LinearGeneral(8, (3, 4), rngs=nnx.Rngs(0)))
    projection = Context(input_shape=(2, 5, 8), in_attention=True)
    assert roles_for(general, "output", (2, 5, 3, 4), None, projection) == heads
    assert roles_for(general, "output", (2, 5, 3, 4), None,
                     Context(input_shape=(2, 5, 8)))[1:] == ("axis1", "axis2", "axis3")

    linear = _abstract(lambda: nnx.Linear(4, 6, rngs=nnx.Rngs(0)))
    pointwise = Context(input_shape=(2, 5, 3, 4), image=(4, 4))
    assert roles_for(linear, "output", (2, 5, 3, 6), 8, pointwise) == image
    assert roles_for(linear, "output", (2, 5, 3, 6), 8) == ("batch", "axis1", "axis2", "neuron")
    assert roles_for(None, "attention", (2, 5, 5), None) == ("batch", "query", "key")


def test_attention_kind_from_the_arguments() -> None:
    from layerscope.backends._jax_attention import attention_kind

    mha = _abstract(lambda: nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
                                                   rngs=nnx.Rngs(0)))
    x, memory = np.zeros((3, 5, 8), np.float32), np.zeros((3, 7, 8), np.float32)
    same_length = np.zeros((3, 5, 8), np.float32)
    probs = (3, 2, 5, 7)
    assert attention_kind(mha, (x,), {}, 3, (3, 2, 5, 5)) == "self"
    assert attention_kind(mha, (x, x), {}, 3, (3, 2, 5, 5)) == "self"
    assert attention_kind(mha, (x,), {"inputs_k": same_length}, 3, (3, 2, 5, 5)) == "cross"
    assert attention_kind(mha, (x, memory), {}, 3, probs) == "cross"

    custom = OwnModule()  # a hand-written module: only what its arguments prove
    ids = np.zeros((3, 5), np.int32)
    assert attention_kind(custom, (x, ids), {}, 3, (3, 2, 5, 5)) == "self"
    assert attention_kind(custom, (x, memory), {}, 3, probs) == "cross"
    assert attention_kind(custom, (x, same_length), {}, 3, (3, 2, 5, 5)) is None
    bias = np.zeros((3, 5, 5), np.float32)  # a bias beside the sequence: not a second input
    assert attention_kind(custom, (x, bias), {}, 3, (3, 2, 5, 5)) is None


def test_encoder_decoder_sides_are_named_or_left_neutral() -> None:
    from layerscope.backends import _jax_seq2seq as seq2seq

    attention = nnx.eval_shape(lambda: nnx.MultiHeadAttention(
        num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0)))
    linear = nnx.eval_shape(lambda: nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    both = [("encoder.layers.0.attention", attention), ("decoder.layers.0.attention", attention)]
    assert seq2seq.is_encoder_decoder(None, both)
    assert not seq2seq.is_encoder_decoder(None, both[:1])  # BERT: an encoder alone
    # a language model whose embedding is called encoder and whose output layer decoder
    assert not seq2seq.is_encoder_decoder(None, [("encoder", linear), ("decoder", linear),
                                                 ("layers.0.attention", attention)])
    plain = ("batch", "token", "hidden")
    assert seq2seq.named(plain, "decoder") == ("batch", "decoder_token", "hidden")
    assert seq2seq.named(plain, "encoder") == plain
    assert seq2seq.named(plain, None) == ("batch", "axis1", "hidden")  # unknown: no side
    time_major = ("token", "batch", "hidden")
    assert seq2seq.named(time_major, None) == ("axis0", "batch", "hidden")  # batch named once
    assert seq2seq.side_of(("batch", "decoder_token", "hidden")) == "decoder"
    assert seq2seq.side_of(plain) == "encoder" and seq2seq.side_of(("batch", "hidden")) is None
    roles = ("batch", "head", "query", "key")
    assert seq2seq.attention_roles(roles, "decoder", "cross") == \
        ("batch", "head", "decoder_query", "key")
    assert seq2seq.attention_roles(roles, "decoder", "self") == \
        ("batch", "head", "decoder_query", "decoder_key")
    assert seq2seq.attention_roles(roles, "encoder", "self") == roles
    assert seq2seq.attention_roles(roles, "decoder", None) == \
        ("batch", "head", "decoder_query", "axis3")

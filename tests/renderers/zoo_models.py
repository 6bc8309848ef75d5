"""Tiny random-weight models of real families, traced for the view tests: GPT-2, Llama, T5
and BART (encoder-decoder, decoder inputs shorter than the encoder's), ViT, ResNet, an LSTM
language model, keras-hub's BERT, a Keras CNN (NHWC) and the Flax NNX BERT port."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import layerscope

LAYERS = 2
BATCH, SOURCE, TARGET = 2, 6, 4  # encoder inputs 6 tokens, decoder inputs 4
ROOT = Path(__file__).resolve().parents[2]


def words(ids: Any) -> list[str]:
    """The 'tokenizer' of every family: id 17 reads w17."""
    return [f"w{int(i)}" for i in ids]


@dataclass(frozen=True)
class Family:
    """A traced model and what its trace is expected to hold."""

    name: str
    path: Path
    hidden_size: int
    stacks: tuple[str, ...] = ()  # ("encoder", "decoder") for encoder-decoder models
    texts: bool = True  # token strings recorded
    attention: bool = True
    hidden: bool = True  # numbered blocks with (batch, token, hidden) outputs
    mlp: bool = True  # (batch, token, neuron) activations
    conv: tuple[str, ...] = ()  # convolution outputs to draw as channel maps
    tokens: int = SOURCE  # positions of the (encoder's) token axis


def _ids(low: int = 3, high: int = 60, shape: tuple[int, int] = (BATCH, SOURCE)) -> np.ndarray:
    return np.random.default_rng(sum(shape)).integers(low, high, shape)


def _torch(model: Any, path: Path, kwargs: dict[str, Any], tokenizer: Any = words) -> None:
    import torch

    with layerscope.trace(model.eval(), path, tokenizer=tokenizer), torch.no_grad():
        model(**kwargs)


def gpt2(path: Path) -> Family:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=LAYERS, n_head=4,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    _torch(GPT2LMHeadModel(config), path, {"input_ids": torch.as_tensor(_ids())})
    return Family("gpt2", path, 32)


def llama(path: Path) -> Family:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, attn_implementation="eager")
    _torch(LlamaForCausalLM(config), path, {"input_ids": torch.as_tensor(_ids())})
    return Family("llama", path, 32)


def t5(path: Path) -> Family:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS,
                      num_decoder_layers=LAYERS, num_heads=4, attn_implementation="eager")
    _torch(T5ForConditionalGeneration(config), path, {
        "input_ids": torch.as_tensor(_ids()),
        "decoder_input_ids": torch.as_tensor(_ids(shape=(BATCH, TARGET)))})
    return Family("t5", path, 32, stacks=("encoder", "decoder"))


def bart(path: Path) -> Family:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=64, d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=32,
                        attn_implementation="eager")
    _torch(BartForConditionalGeneration(config), path, {
        "input_ids": torch.as_tensor(_ids()),
        "decoder_input_ids": torch.as_tensor(_ids(shape=(BATCH, TARGET)))})
    return Family("bart", path, 32, stacks=("encoder", "decoder"))


def vit(path: Path) -> Family:
    import torch
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                       intermediate_size=64, image_size=16, patch_size=8, num_channels=3,
                       attn_implementation="eager")
    pixels = torch.as_tensor(np.random.default_rng(1).random((BATCH, 3, 16, 16)), dtype=torch.float32)
    _torch(ViTModel(config), path, {"pixel_values": pixels}, tokenizer=None)
    return Family("vit", path, 32, texts=False, tokens=5,  # [CLS] and 2 x 2 patches
                  conv=("embeddings.patch_embeddings.projection@output",))


def resnet(path: Path) -> Family:
    import torch
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic")
    pixels = torch.as_tensor(np.random.default_rng(2).random((BATCH, 3, 32, 32)), dtype=torch.float32)
    _torch(ResNetModel(config), path, {"pixel_values": pixels}, tokenizer=None)
    return Family("resnet", path, 16, texts=False, attention=False, hidden=False, mlp=False,
                  conv=("embedder.embedder.convolution@output", "pooler@output"))


def lstm(path: Path) -> Family:
    import torch
    from torch import nn

    class LanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(64, 16)
            self.lstm = nn.LSTM(16, 24, num_layers=LAYERS, batch_first=True)
            self.head = nn.Linear(24, 64)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            states, _ = self.lstm(self.embed(input_ids))
            return self.head(states)

    torch.manual_seed(0)
    _torch(LanguageModel(), path, {"input_ids": torch.as_tensor(_ids())})
    return Family("lstm", path, 24, attention=False, hidden=False, mlp=False)


def keras_bert(path: Path) -> Family:
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    model = keras_hub.models.BertBackbone(vocabulary_size=64, num_layers=LAYERS, num_heads=2,
                                          hidden_dim=16, intermediate_dim=32,
                                          max_sequence_length=16)
    ids = _ids()
    # tensors, not NumPy arrays: the backend takes token ids from tensors it is handed
    inputs = {key: keras.ops.convert_to_tensor(value.astype("int32")) for key, value in
              {"token_ids": ids, "segment_ids": 0 * ids, "padding_mask": 1 + 0 * ids}.items()}
    with layerscope.trace(model, path, tokenizer=words):
        model(inputs)
    return Family("keras_bert", path, 16)


def keras_cnn(path: Path) -> Family:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.GlobalAveragePooling2D(name="pool"),
                              keras.layers.Dense(3, name="out")])
    with layerscope.trace(model, path):
        model(np.random.default_rng(3).random((BATCH, 8, 8, 1)).astype("float32"))
    return Family("keras_cnn", path, 3, texts=False, attention=False, hidden=False, mlp=False,
                  conv=("conv@output",))


def flax_bert(path: Path) -> Family:
    import jax.numpy as jnp
    from flax import nnx

    name = "flax_bert"
    port = sys.modules.get(name)
    if port is None:  # examples/minilm/flax_bert.py; its dataclass needs a module by name
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples/minilm/flax_bert.py")
        assert spec is not None and spec.loader is not None
        port = importlib.util.module_from_spec(spec)
        sys.modules[name] = port
        spec.loader.exec_module(port)
    config = port.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=LAYERS,
                             num_attention_heads=4, intermediate_size=24,
                             max_position_embeddings=16)
    model = port.FlaxBertModel(config, nnx.Rngs(0))
    ids = jnp.asarray(_ids(), jnp.int32)
    with layerscope.trace(model, path, tokenizer=words):
        model(ids, jnp.ones_like(ids))
    return Family("flax_bert", path, 16)


TORCH: dict[str, Callable[[Path], Family]] = {
    "gpt2": gpt2, "llama": llama, "t5": t5, "bart": bart, "vit": vit, "resnet": resnet,
    "lstm": lstm,
}
KERAS: dict[str, Callable[[Path], Family]] = {"keras_bert": keras_bert, "keras_cnn": keras_cnn}
FLAX: dict[str, Callable[[Path], Family]] = {"flax_bert": flax_bert}

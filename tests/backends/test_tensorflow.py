"""TensorFlow/Keras specifics: model(x), model.predict(x) and tf.function capture, Sequential /
functional / subclassed models, nested paths, MultiHeadAttention, inputs, restoration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

import layerscope
from layerscope.backends import detect
from layerscope.backends._keras_tree import named_layers

from .kit_tensorflow import TensorFlowKit, TinyTransformer

KIT = TensorFlowKit()


def _probe(model: keras.Model, site: str, x: np.ndarray) -> np.ndarray:
    """What layer ``site`` of a functional/Sequential model returns, by Keras alone."""
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.ops.convert_to_numpy(keras.Model(inputs, model.get_layer(site).output)(x))


def _images(n: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8, 8, 1)).astype(np.float32)


def _state(model: Any) -> Any:
    return KIT.hook_state(type("C", (), {"model": model})())


def test_detected_without_importing_on_purpose() -> None:
    model = KIT.build("mlp").model
    assert detect(model).name == "keras/tensorflow"
    assert layerscope.sites(model)[0].path == "root"


def test_predict_is_captured_and_equals_its_own_outputs(tmp_path: Path) -> None:
    case = KIT.build("cnn")
    model = case.model
    x = _images(12)
    model.predict(x[:4], verbose=0)  # a predict function traced before the block
    before = _state(model)
    path = tmp_path / "predict.zarr"
    with layerscope.trace(model, path, capture=["conv", "pool", "fc", "root"]):
        predicted = model.predict(x, batch_size=4, verbose=0)
    assert _state(model) == before  # the pre-block predict function is back
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 3 and ds.sizes["batch"] == 12
    # the recorded root output is exactly what predict returned from the same graph
    np.testing.assert_array_equal(ds["root@output"].values, predicted)
    assert ds["conv@output"].dims == ("batch", "height", "width", "channel")
    for site in ("conv", "pool", "fc"):
        np.testing.assert_allclose(ds[f"{site}@output"].values, _probe(model, site, x),
                                   rtol=1e-6, atol=1e-6, err_msg=site)
    # after the block predict runs as before and writes nothing more
    np.testing.assert_array_equal(model.predict(x, batch_size=4, verbose=0), predicted)
    assert layerscope.open_trace(path).sizes["batch"] == 12


def test_predict_on_functional_rnn(tmp_path: Path) -> None:
    model = KIT.build("rnn").model
    x = np.random.default_rng(3).standard_normal((6, 6, 4)).astype(np.float32)
    path = tmp_path / "rnn.zarr"
    with layerscope.trace(model, path, capture=["gru", "lstm", "head"]):
        predicted = model.predict(x, batch_size=3, verbose=0)
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 2
    np.testing.assert_allclose(ds["head@output"].values, predicted, rtol=1e-6, atol=1e-6)
    for site in ("gru", "lstm"):
        np.testing.assert_allclose(ds[f"{site}@output"].values, _probe(model, site, x),
                                   rtol=1e-5, atol=1e-6, err_msg=site)


def test_tf_function_is_captured_in_call_order(tmp_path: Path) -> None:
    case = KIT.build("transformer")
    model: TinyTransformer = case.model
    step = tf.function(lambda ids: model(ids))
    path = tmp_path / "graph.zarr"
    returned = []
    with layerscope.trace(model, path, capture=list(case.sites) + ["root"]):
        for batch in range(3):
            returned.append(step(KIT.inputs(case, batch)).numpy())
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 3
    rows = case.batch_size
    for batch in range(3):
        part = ds.isel(batch=slice(batch * rows, (batch + 1) * rows))
        np.testing.assert_array_equal(part["root@output"].values, returned[batch])
        for site in case.sites:
            np.testing.assert_allclose(part[f"{site}@output"].values,
                                       KIT.reference(case, batch, site), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(part["attn@attention"].values,
                                   KIT.reference_attention(case, batch), rtol=1e-5, atol=1e-6)
    # the graph traced in the block still runs afterwards, and records nothing
    again = step(KIT.inputs(case, 0)).numpy()
    np.testing.assert_array_equal(again, returned[0])
    assert layerscope.open_trace(path).sizes["batch"] == 3 * rows


def test_capture_does_not_change_outputs() -> None:
    case = KIT.build("transformer")
    ids = KIT.inputs(case, 1)
    plain = case.model(ids).numpy()
    from layerscope.core import Selection

    recorder = _NullRecorder()  # keeps nothing: only the model's behaviour matters here
    with detect(case.model).attach(case.model, Selection(), recorder):  # type: ignore[arg-type]
        traced = case.model(ids).numpy()
    np.testing.assert_array_equal(traced, plain)
    assert recorder.puts > 0


class _NullRecorder:
    """Accepts every pass and tensor and stores nothing."""

    def __init__(self) -> None:
        self.in_pass = False
        self.puts = 0

    def begin_pass(self, batch_size: int, token_ids: Any = None) -> None:
        self.in_pass = True

    def put(self, *args: Any, **kwargs: Any) -> None:
        self.puts += 1

    def end_pass(self) -> None:
        self.in_pass = False

    def abort_pass(self) -> None:
        self.in_pass = False


class Block(keras.layers.Layer):
    def __init__(self, width: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._inner = keras.layers.Dense(width, name="ignored_name")
        self.norm = keras.layers.LayerNormalization()

    def call(self, x: Any) -> Any:
        return self.norm(x + self._inner(x))


class Nested(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.stem = keras.layers.Dense(6)
        self.blocks = [Block(6), Block(6)]
        inputs = keras.Input((6,))
        self.head = keras.Model(inputs, keras.layers.Dense(2, name="logits")(inputs), name="head")

    def call(self, x: Any) -> Any:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_nested_paths_mirror_the_model(tmp_path: Path) -> None:
    keras.utils.set_random_seed(1)
    model = Nested()
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    expected = model(x).numpy()
    paths = [s.path for s in layerscope.sites(model)]
    assert paths == ["root", "stem", "blocks.0", "blocks.0.inner", "blocks.0.norm", "blocks.1",
                     "blocks.1.inner", "blocks.1.norm", "head", "head.logits"]
    ds = layerscope.capture(model, x, tmp_path / "nested.zarr",
                            capture=["blocks.*.inner", "head.*"])
    assert layerscope.captured_names(ds) == [
        "blocks.0.inner@output", "blocks.1.inner@output", "head.logits@output"]
    assert ds["blocks.1.inner@output"].attrs["layer"] == 1
    stem = model.stem(x)
    first = model.blocks[0](stem)
    np.testing.assert_array_equal(ds["blocks.0.inner@output"].values,
                                  model.blocks[0]._inner(stem).numpy())
    np.testing.assert_array_equal(ds["blocks.1.inner@output"].values,
                                  model.blocks[1]._inner(first).numpy())
    np.testing.assert_array_equal(ds["head.logits@output"].values, expected)


def test_inputs_on_request(tmp_path: Path) -> None:
    case = KIT.build("mlp")
    x = KIT.inputs(case, 0)
    ds = layerscope.capture(case.model, x, tmp_path / "inputs.zarr", capture=["fc2"],
                            kinds=["input", "output"])
    np.testing.assert_array_equal(ds["fc2@input"].values, _probe(case.model, "act", x))
    np.testing.assert_array_equal(ds["fc2@output"].values, _probe(case.model, "fc2", x))


class ScoresModel(keras.Model):
    """Asks its attention layer for the scores and returns them."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = keras.layers.MultiHeadAttention(3, 4, name="attn")

    def call(self, x: Any) -> Any:
        return self.attn(x, x, return_attention_scores=True, use_causal_mask=True)


def test_returned_scores_are_stored_once_as_attention(tmp_path: Path) -> None:
    keras.utils.set_random_seed(2)
    model = ScoresModel()
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    output, scores = (t.numpy() for t in model(x))
    ds = layerscope.capture(model, x, tmp_path / "scores.zarr", capture=["attn"])
    assert "attn@output.1" not in ds
    np.testing.assert_array_equal(ds["attn@attention"].values, scores)
    np.testing.assert_array_equal(ds["attn@output"].values, output)
    assert np.all(np.triu(ds["attn@attention"].values[0, 0], 1) == 0)  # causal mask applied


def test_causal_fused_attention_probabilities(tmp_path: Path) -> None:
    """Without dropout and without asking, MultiHeadAttention takes the fused kernel that
    returns no scores: they are recomputed and equal what the layer returns when asked."""
    keras.utils.set_random_seed(3)
    attn = keras.layers.MultiHeadAttention(2, 4, name="attn")
    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, attn(inputs, inputs, use_causal_mask=True))
    x = np.random.default_rng(2).standard_normal((3, 6, 8)).astype(np.float32)
    plain = model(x).numpy()
    ds = layerscope.capture(model, x, tmp_path / "causal.zarr", capture=["attn"])
    _, scores = attn(x, x, use_causal_mask=True, return_attention_scores=True)
    np.testing.assert_allclose(ds["attn@attention"].values, scores.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ds["attn@output"].values, plain)


def test_failure_while_tracing_a_graph_restores_everything(tmp_path: Path) -> None:
    case = KIT.build("cnn")
    model = case.model
    model.predict(_images(4), verbose=0)  # Keras settles its lazy jit_compile setting here
    before = _state(model)
    path = tmp_path / "broken.zarr"
    with pytest.raises(KeyboardInterrupt):
        with layerscope.trace(model, path):
            with KIT.failing(case, KeyboardInterrupt()):
                model.predict(_images(4), verbose=0)
    assert _state(model) == before
    assert all("call" not in vars(layer) for _, layer in named_layers(model))
    np.testing.assert_array_equal(model.predict(_images(4), verbose=0), model(_images(4)).numpy())


# -- all-MiniLM-L6-v2 in keras-hub's BertBackbone, from the packaged Hugging Face folder -----

MINILM_BATCH = 2


@pytest.fixture(scope="module")
def keras_minilm(minilm_folder):
    from layerscope.backends.tensorflow import load_hf_folder

    return load_hf_folder(minilm_folder)


@pytest.fixture(scope="module")
def keras_minilm_trace(keras_minilm, tmp_path_factory):
    from ..conftest import TEXTS

    model, tokenizer = keras_minilm
    path = tmp_path_factory.mktemp("keras_minilm") / "minilm.zarr"
    return layerscope.capture(model, TEXTS, path, tokenizer=tokenizer, batch_size=MINILM_BATCH)


def test_minilm_sites_and_dims(keras_minilm, keras_minilm_trace) -> None:
    model, _ = keras_minilm
    ds = keras_minilm_trace
    attention = [s.path for s in layerscope.sites(model) if s.is_attention]
    assert attention == [f"transformer_layers.{i}.self_attention_layer" for i in range(6)]
    assert ds.attrs["committed_batches"] == 3 and ds.attrs["framework"] == "keras/tensorflow"
    var = ds["transformer_layers.3.self_attention_layer@attention"]
    assert var.dims == ("batch", "head", "query", "key") and var.attrs["layer"] == 3
    assert ds["transformer_layers.0.feedforward_intermediate_dense@output"].dims == (
        "batch", "token", "neuron")
    np.testing.assert_allclose(var.sum("key").values, 1.0, rtol=1e-5)


def test_minilm_outputs_equal_the_keras_model(keras_minilm, keras_minilm_trace) -> None:
    from ..conftest import TEXTS

    model, tokenizer = keras_minilm
    ds = keras_minilm_trace
    length = ds.sizes["token"]
    for start in range(0, len(TEXTS), MINILM_BATCH):
        texts = TEXTS[start:start + MINILM_BATCH]
        encoded = tokenizer(texts, padding="max_length", max_length=length, return_tensors="np")
        out = model(encoded)
        rows = slice(start, start + len(texts))
        np.testing.assert_array_equal(ds["root@output.sequence_output"].isel(batch=rows).values,
                                      out["sequence_output"].numpy())
        np.testing.assert_array_equal(ds["root@output.pooled_output"].isel(batch=rows).values,
                                      out["pooled_output"].numpy())
        np.testing.assert_array_equal(ds["token_id"].isel(batch=rows).values,
                                      encoded["token_ids"])


def test_minilm_matches_the_pytorch_model(keras_minilm_trace, minilm_folder,
                                          minilm_tokenizer) -> None:
    """The same weights in PyTorch (transformers, eager attention) give the same tokens,
    embeddings and first attention maps up to float round-off. Deeper layers differ a little
    by design: keras-hub's BERT uses the tanh-approximate GELU, transformers the exact one."""
    import torch

    from ..conftest import TEXTS, load_minilm

    ds = keras_minilm_trace
    torch_model = load_minilm(minilm_folder, "eager")
    encoded = minilm_tokenizer(TEXTS, padding="max_length", max_length=ds.sizes["token"],
                               return_tensors="pt")
    with torch.no_grad():
        out = torch_model(**encoded, output_attentions=True, output_hidden_states=True)
    np.testing.assert_array_equal(ds["token_id"].values, encoded["input_ids"].numpy())
    assert list(ds["token_text"].values[0][:3]) == \
        minilm_tokenizer.convert_ids_to_tokens(encoded["input_ids"][0][:3].tolist())
    np.testing.assert_allclose(ds["embeddings_layer_norm@output"].values,
                               out.hidden_states[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(ds["transformer_layers.0.self_attention_layer@attention"].values,
                               out.attentions[0].numpy(), atol=1e-5)
    real = encoded["attention_mask"].numpy().astype(bool)
    for layer in range(6):
        np.testing.assert_allclose(ds[f"transformer_layers.{layer}@output"].values[real],
                                   out.hidden_states[layer + 1].numpy()[real], atol=1e-2,
                                   err_msg=f"layer {layer}")
        np.testing.assert_allclose(
            ds[f"transformer_layers.{layer}.self_attention_layer@attention"].values,
            out.attentions[layer].numpy(), atol=1e-2, err_msg=f"attention {layer}")


def test_minilm_keras_hub_tokenizer_is_adapted(keras_minilm, minilm_folder, tmp_path) -> None:
    import keras_hub

    from layerscope.backends.tensorflow import BACKEND

    model, loaded = keras_minilm
    raw = keras_hub.models.BertTokenizer.from_preset(str(minilm_folder))
    adapted = BACKEND.adapt_tokenizer(raw, model)
    texts = ["Hello tokens.", "A second, longer sentence to pad the first."]
    mine = adapted(texts, padding=True, return_tensors="np")
    theirs = loaded(texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(mine["token_ids"], theirs["token_ids"])
    assert adapted.convert_ids_to_tokens(mine["token_ids"][0][:2]) == ["[CLS]", "hello"]
    ds = layerscope.capture(model, texts, tmp_path / "adapted.zarr", capture=["root"],
                            tokenizer=adapted)
    np.testing.assert_array_equal(ds["root@output.sequence_output"].values,
                                  model(mine)["sequence_output"].numpy())
    # capture adapts the raw keras-hub tokenizer by itself
    raw_ds = layerscope.capture(model, texts, tmp_path / "raw.zarr", capture=["root"],
                                tokenizer=raw)
    np.testing.assert_array_equal(raw_ds["root@output.sequence_output"].values,
                                  ds["root@output.sequence_output"].values)
    assert list(raw_ds["token_text"].values[0][:2]) == ["[CLS]", "hello"]


def test_minilm_cli_trace(tmp_path) -> None:
    from layerscope.cli import main

    path = tmp_path / "cli.zarr"
    status = main(["trace", "minilm", "--framework", "tensorflow", "-o", str(path),
                   "--text", "Keras from the command line.", "--text", "Second text.",
                   "--capture", "transformer_layers.0*", "--no-progress"])
    assert status == 0
    ds = layerscope.open_trace(path)
    assert ds.attrs["framework"] == "keras/tensorflow"
    assert list(ds["input_text"].values) == ["Keras from the command line.", "Second text."]
    assert ds["transformer_layers.0.self_attention_layer@attention"].sizes["batch"] == 2
    assert all(name.startswith("transformer_layers.0") for name in layerscope.captured_names(ds))


def test_kinds_per_pattern(tmp_path: Path) -> None:
    case = KIT.build("transformer")
    path = tmp_path / "kinds.zarr"
    with layerscope.trace(case.model, path, capture=["attn@attention", "norm"]):
        KIT.run(case, 0)
    assert layerscope.captured_names(layerscope.open_trace(path)) == [
        "attn@attention", "norm@output"]


def test_keras_backend_names() -> None:
    """``tensorflow`` (the registry name), ``keras`` and ``keras/tensorflow`` name one backend;
    a Keras backend this process does not run is refused with the reason."""
    from layerscope.backends import get_backend
    from layerscope.core import BackendError

    backend = get_backend("tensorflow")
    assert get_backend("keras") is backend and get_backend("keras/tensorflow") is backend
    assert backend.framework_version().startswith(f"keras {keras.__version__} on tensorflow")
    with pytest.raises(BackendError, match="Keras runs on 'keras/tensorflow' in this process"):
        get_backend("keras/jax")


def test_nhwc_maps_line_up_with_a_pytorch_trace_by_name(tmp_path: Path) -> None:
    """One CNN in both frameworks with the same weights: the Keras NHWC trace and the PyTorch
    NCHW trace agree once the Keras variables are transposed to the PyTorch dim names."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch_cnn = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2)).eval()
    keras_cnn = keras.Sequential([
        keras.Input((8, 8, 2)), keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.ReLU(name="act"), keras.layers.MaxPooling2D(2, name="pool"),
    ])
    conv = torch_cnn[0]
    keras_cnn.get_layer("conv").set_weights([conv.weight.detach().numpy().transpose(2, 3, 1, 0),
                                             conv.bias.detach().numpy()])
    nchw = np.random.default_rng(5).standard_normal((3, 2, 8, 8)).astype(np.float32)
    ours = layerscope.capture(keras_cnn, nchw.transpose(0, 2, 3, 1), tmp_path / "keras.zarr")
    theirs = layerscope.capture(torch_cnn, torch.from_numpy(nchw), tmp_path / "torch.zarr")
    for keras_site, torch_site in (("conv", "0"), ("act", "1"), ("pool", "2")):
        mine, reference = ours[f"{keras_site}@output"], theirs[f"{torch_site}@output"]
        assert set(mine.dims) == set(reference.dims)
        assert tuple(mine.attrs["roles"]) == ("batch", "height", "width", "channel")
        assert tuple(reference.attrs["roles"]) == ("batch", "channel", "height", "width")
        np.testing.assert_allclose(mine.transpose(*reference.dims).values, reference.values,
                                   rtol=1e-5, atol=1e-5, err_msg=keras_site)


def test_first_call_builds_the_model_inside_the_trace(tmp_path: Path) -> None:
    """An unbuilt subclassed model builds itself (Keras traces ``call`` into a scratch graph
    to infer shapes) during the captured call: no stray warning, values as the model's."""
    import warnings

    keras.utils.set_random_seed(4)
    model = Nested()
    x = np.random.default_rng(6).standard_normal((2, 5)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = layerscope.capture(model, x, tmp_path / "build.zarr")
    assert not [w for w in caught if "layerscope" in str(w.message)]
    assert len(layerscope.captured_names(ds)) == len(layerscope.sites(model))
    np.testing.assert_array_equal(ds["root@output"].values, model(x).numpy())
    np.testing.assert_array_equal(ds["stem@output"].values, model.stem(x).numpy())


def test_bfloat16_is_stored_as_float32_exactly(tmp_path: Path) -> None:
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(3, dtype="mixed_bfloat16", name="half")])
    x = np.random.default_rng(7).standard_normal((2, 4)).astype(np.float32)
    returned = model(x)
    assert returned.dtype == tf.bfloat16
    ds = layerscope.capture(model, x, tmp_path / "bf16.zarr", capture=["half"])
    assert ds["half@output"].dtype == np.float32
    np.testing.assert_array_equal(ds["half@output"].values,
                                  tf.cast(returned, tf.float32).numpy())


def test_minilm_predict_equals_eager_capture(keras_minilm, keras_minilm_trace, tmp_path) -> None:
    """model.predict (a tf.function graph) on the real model: the pass recorded from inside
    the graph holds what predict returned and what the eager run recorded."""
    from ..conftest import TEXTS

    model, tokenizer = keras_minilm
    eager = keras_minilm_trace
    inputs = tokenizer(TEXTS, padding="max_length", max_length=eager.sizes["token"],
                       return_tensors="np")
    path = tmp_path / "predict.zarr"
    with layerscope.trace(model, path, ["transformer_layers.[0-9]", "root@output",
                                        "transformer_layers.*.self_attention_layer@attention"]):
        predicted = model.predict(inputs, batch_size=MINILM_BATCH, verbose=0)
    ds = layerscope.open_trace(path)
    assert ds.attrs["committed_batches"] == 3
    np.testing.assert_array_equal(ds["root@output.sequence_output"].values,
                                  predicted["sequence_output"])
    for layer in range(6):
        for name in (f"transformer_layers.{layer}@output",
                     f"transformer_layers.{layer}.self_attention_layer@attention"):
            np.testing.assert_allclose(ds[name].values, eager[name].values, rtol=1e-4,
                                       atol=1e-5, err_msg=name)


def test_cli_trace_of_a_keras_factory(tmp_path: Path) -> None:
    from layerscope.cli import main

    factory = tmp_path / "make_keras.py"
    factory.write_text(
        "import keras, numpy as np\n"
        "def make():\n"
        "    keras.utils.set_random_seed(0)\n"
        "    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, "
        "name='conv'), keras.layers.GlobalAveragePooling2D(name='gap')])\n"
        "    x = np.random.default_rng(0).standard_normal((3, 8, 8, 1)).astype('float32')\n"
        "    return {'model': model, 'inputs': x}\n"
    )
    path = tmp_path / "factory.zarr"
    assert main(["trace", f"{factory}:make", "-o", str(path), "--no-progress"]) == 0
    ds = layerscope.open_trace(path)
    assert ds.attrs["framework"] == "keras/tensorflow"
    assert ds["conv@output"].dims == ("batch", "height", "width", "channel")
    np.testing.assert_allclose(ds["gap@output"].values, ds["conv@output"].mean(("height", "width")),
                               rtol=1e-5, atol=1e-6)


class Loop(keras.Model):
    """Calls a layer inside a tf.while_loop: in a graph its values stay in the loop body."""

    def __init__(self) -> None:
        super().__init__()
        self.step = keras.layers.Dense(4, name="step")
        self.out = keras.layers.Dense(2, name="out")

    def call(self, x: Any) -> Any:
        _, x = tf.while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, self.step(h)), (0, x))
        return self.out(x)


def test_layer_inside_a_graph_loop_is_skipped_with_a_warning(tmp_path: Path) -> None:
    model = Loop()
    x = np.ones((2, 4), np.float32)
    model(x)
    step = tf.function(lambda v: model(v))
    path = tmp_path / "loop.zarr"
    with pytest.warns(UserWarning, match="step@output runs inside a tf.while_loop"):
        with layerscope.trace(model, path):
            returned = step(x).numpy()
    ds = layerscope.open_trace(path)
    assert layerscope.captured_names(ds) == ["out@output", "root@output"]
    np.testing.assert_array_equal(ds["out@output"].values, returned)
    # eagerly the loop runs in Python: every step is captured, one variable per call
    eager = layerscope.capture(model, x, tmp_path / "eager.zarr", capture=["step"])
    assert layerscope.captured_names(eager) == ["step@output", "step@output.call1",
                                                "step@output.call2"]


def test_self_and_cross_attention_are_labeled(tmp_path: Path) -> None:
    """keras-hub's TransformerDecoder with an encoder sequence: its self-attention gets the
    decoder's states as query, key and value, its cross-attention the encoder's as key and
    value; each map says which it is, and equals the scores the layer returns when asked
    on the same arguments."""
    import keras_hub

    keras.utils.set_random_seed(6)
    decoder = keras_hub.layers.TransformerDecoder(intermediate_dim=16, num_heads=2)
    rng = np.random.default_rng(8)
    states = rng.standard_normal((2, 5, 8)).astype(np.float32)
    encoded = rng.standard_normal((2, 3, 8)).astype(np.float32)
    decoder(states, encoded)  # build
    path = tmp_path / "decoder.zarr"
    with layerscope.trace(decoder, path):
        decoder(states, encoded)
    ds = layerscope.open_trace(path)

    layers = {"self_attention_layer": decoder._self_attention_layer,
              "cross_attention_layer": decoder._cross_attention_layer}
    calls: dict[str, Any] = {}
    for site, layer in layers.items():
        def record(*args: Any, _site: str = site, _call: Any = layer.call, **kwargs: Any) -> Any:
            calls[_site] = (args, kwargs)
            return _call(*args, **kwargs)

        object.__setattr__(layer, "call", record)
    try:
        decoder(states, encoded)
    finally:
        for layer in layers.values():
            object.__delattr__(layer, "call")
    for site, expected in (("self_attention_layer", "self"), ("cross_attention_layer", "cross")):
        var = ds[f"{site}@attention"]
        assert var.attrs["attention"] == expected, site
        args, kwargs = calls[site]
        _, scores = layers[site](*args, **{**kwargs, "return_attention_scores": True})
        np.testing.assert_array_equal(var.values, scores.numpy(), err_msg=site)
    assert ds["cross_attention_layer@attention"].shape == (2, 2, 5, 3)

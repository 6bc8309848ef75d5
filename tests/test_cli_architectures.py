"""``layerscope trace FOLDER`` loads the class the folder's config.json names, head included,
and feeds it what that class reads: texts (causal LMs, encoders), texts and target texts
(encoder-decoders) or images (vision models). A model it cannot feed is refused in one line
before a store exists.

The folders are tiny random-weight models saved on the fly. The Llama folder gets a word-level
tokenizer without a pad token, as real Llama and GPT-2 tokenizers have none; the other text
models get the packaged MiniLM's tokenizer files, whose vocabulary sizes their embeddings.
Folders that are only refused hold a config.json alone: the refusal comes before any weight
is read."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import layerscope
from layerscope.cli import main

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                   "special_tokens_map.json")
TEXTS = ["the cat sat on the mat", "hello world"]
TARGETS = ["a dog ran away fast", "good morning"]
#: the decoder's first token: T5 starts from its pad token, BART from its end token
DECODER_START = {"t5": 0, "bart": 102}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


#: the Llama folder's word-level vocabulary: no pad token
WORDS = ["<unk>", "<s>", "</s>", *sorted({w for text in TEXTS for w in text.split()})]


def _word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _models(vocab: int) -> dict[str, Callable[[], Any]]:
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
            bos_token_id=WORDS.index("<s>"), eos_token_id=WORDS.index("</s>"))),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
            pad_token_id=0, eos_token_id=102, decoder_start_token_id=DECODER_START["t5"])),
        "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
            decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=101,
            eos_token_id=102, decoder_start_token_id=DECODER_START["bart"])),
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(
            vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=64)),
        "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            image_size=32, patch_size=8, num_labels=3)),
        "resnet": lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory, minilm_folder, minilm_tokenizer) -> Callable[[str], Path]:
    """``folders(name)``: the saved model folder, built on first use."""
    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("folders")
    models = _models(len(minilm_tokenizer))
    built: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in built:
            torch.manual_seed(0)
            path = root / name
            models[name]().save_pretrained(path)
            if name == "vit":  # vit has an image processor; resnet is left without one
                tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
            elif name == "llama":
                _word_tokenizer().save_pretrained(path)
            elif name != "resnet":
                for file in TOKENIZER_FILES:
                    shutil.copy(minilm_folder / file, path / file)
            built[name] = path
        return built[name]

    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    made = {"png": root / "a.png", "jpeg": root / "b.jpg", "gif": root / "c.gif"}
    for path, shape in zip(made.values(), [(40, 50, 3), (30, 30, 3), (8, 8, 3)], strict=True):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
    made["not_an_image"] = root / "d.png"
    made["not_an_image"].write_text("not pixels\n")
    return made


def trace(folder: Path, out: Path, *args: str) -> Any:
    assert main(["trace", str(folder), "-o", str(out), "--no-progress", *args]) == 0
    return layerscope.open_trace(out)


def model_class(ds) -> str:
    return ds.attrs["model"]["class"].rsplit(".", 1)[-1]


def shifted_right(ids: np.ndarray, start: int) -> np.ndarray:
    return np.concatenate([np.full((len(ids), 1), start, ids.dtype), ids[:, :-1]], axis=1)


# -- what each kind of folder gets -----------------------------------------------------------

def test_a_causal_lm_is_traced_with_its_head(folders, tmp_path):
    ds = trace(folders("llama"), tmp_path / "t.zarr", "--text", TEXTS[0], "--text", TEXTS[1])
    assert model_class(ds) == "LlamaForCausalLM"
    # its tokenizer has no pad token: the shorter text is padded with the end token
    end = WORDS.index("</s>")
    ids = [[WORDS.index(w) for w in text.split()] for text in TEXTS]
    padded = np.array([row + [end] * (len(ids[0]) - len(row)) for row in ids])
    np.testing.assert_array_equal(ds["token_id"].values, padded)
    assert ds["root@output.logits"].shape == (*padded.shape, len(WORDS))


def test_an_encoder_is_traced_as_the_class_its_config_names(folders, minilm_tokenizer,
                                                            tmp_path):
    ds = trace(folders("bert"), tmp_path / "t.zarr", "--text", TEXTS[1])
    assert model_class(ds) == "BertForMaskedLM"
    ids = minilm_tokenizer([TEXTS[1]], return_tensors="np")["input_ids"]
    assert ds["root@output.logits"].shape == (*ids.shape, len(minilm_tokenizer))


@pytest.mark.parametrize("name, expected", [
    ("llama", "LlamaForCausalLM"),  # causal LM types get their head
    ("t5", "T5ForConditionalGeneration"),  # encoder-decoders theirs
    ("bert", "BertModel"),  # a masked-LM type gets the bare model
])
def test_a_config_without_architectures_gets_the_class_of_its_type(folders, tmp_path, name,
                                                                   expected):
    folder = tmp_path / name
    shutil.copytree(folders(name), folder)
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    ds = trace(folder, tmp_path / "t.zarr", "--text", TEXTS[1], "--capture", "root@output")
    assert model_class(ds) == expected


@pytest.mark.parametrize("name, expected", [("t5", "T5ForConditionalGeneration"),
                                            ("bart", "BartForConditionalGeneration")])
def test_an_encoder_decoder_reads_the_target_texts(folders, minilm_tokenizer, tmp_path, name,
                                                   expected):
    args = [a for text, target in zip(TEXTS, TARGETS, strict=True)
            for a in ("--text", text, "--target-text", target)]
    ds = trace(folders(name), tmp_path / "t.zarr", *args)
    assert model_class(ds) == expected
    targets = minilm_tokenizer(text_target=TARGETS, padding=True, return_tensors="np")
    # the decoder reads each target shifted right behind its start token: position i's
    # logits predict target token i
    np.testing.assert_array_equal(ds["decoder_token_id"].values,
                                  shifted_right(targets["input_ids"], DECODER_START[name]))
    assert ds["root@output.logits"].shape == (*targets["input_ids"].shape,
                                              len(minilm_tokenizer))
    encoded = minilm_tokenizer(TEXTS, padding=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ds["token_id"].values, encoded)
    assert list(ds["input_text"].values) == TEXTS


def test_appended_targets_are_padded_to_the_stored_decoder_length(folders, minilm_tokenizer,
                                                                  tmp_path):
    out = tmp_path / "t.zarr"
    trace(folders("t5"), out, "--text", TEXTS[0], "--target-text", TARGETS[0])
    ds = trace(folders("t5"), out, "--append", "--text", TEXTS[1], "--target-text", TARGETS[1])
    targets = minilm_tokenizer(text_target=TARGETS, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ds["decoder_token_id"].values,
                                  shifted_right(targets["input_ids"], DECODER_START["t5"]))
    assert ds.attrs["committed_batches"] == 2


def test_without_target_text_the_decoder_reads_the_input_text(folders, minilm_tokenizer,
                                                             tmp_path):
    ds = trace(folders("t5"), tmp_path / "t.zarr", "--text", TEXTS[0], "--text", TEXTS[1],
               "--batch-size", "1")
    own = minilm_tokenizer(text_target=TEXTS, padding=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ds["decoder_token_id"].values,
                                  shifted_right(own, DECODER_START["t5"]))
    assert ds.attrs["committed_batches"] == 2


def test_a_vision_model_reads_images_through_its_image_processor(folders, images, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    folder = folders("vit")
    projection = "vit.embeddings.patch_embeddings.projection@input"
    ds = trace(folder, tmp_path / "t.zarr", "--image", str(images["png"]), "--image",
               str(images["jpeg"]), "--batch-size", "1", "--capture", "root@output",
               "--capture", projection)
    assert model_class(ds) == "ViTForImageClassification"
    assert ds["root@output.logits"].shape == (2, 3)
    assert ds.attrs["committed_batches"] == 2
    opened = [Image.open(images[k]).convert("RGB") for k in ("png", "jpeg")]
    expected = AutoImageProcessor.from_pretrained(folder)(images=opened,
                                                          return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ds[projection].values, expected, rtol=1e-6, atol=1e-6)


def test_a_vision_folder_without_image_processor_gets_the_documented_preprocessing(
        folders, images, tmp_path):
    from PIL import Image

    conv = "resnet.embedder.embedder.convolution@input"
    ds = trace(folders("resnet"), tmp_path / "t.zarr", "--image", str(images["png"]),
               "--capture", "root@output", "--capture", conv)
    assert model_class(ds) == "ResNetForImageClassification"
    assert ds["root@output.logits"].shape == (1, 3)
    # no image_size in a ResNet config: 224 x 224, bilinear, 0..1, ImageNet mean and std
    image = Image.open(images["png"]).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    scaled = np.asarray(image, np.float32) / 255
    expected = ((scaled - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(ds[conv].values, expected, rtol=1e-5, atol=1e-5)


# -- what is refused, before a store exists --------------------------------------------------

@pytest.fixture(scope="module")
def configs(tmp_path_factory, images) -> dict[str, Path]:
    """Folders holding a config.json only, and a factory file."""
    import transformers as tf

    root = tmp_path_factory.mktemp("configs")
    made = {
        "llama": tf.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
        "t5": tf.T5Config(d_model=16, num_layers=1, decoder_start_token_id=0),
        "t5_without_start": tf.T5Config(d_model=16, num_layers=1),
        "vit": tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
        "wav2vec2": tf.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1),
        "clip": tf.CLIPConfig(),
    }
    folders = {}
    for name, config in made.items():
        config.architectures = [_class_name(name)]
        config.save_pretrained(root / name)
        folders[name] = root / name
    for name, doc in {"unknown": {"model_type": "no_such_model", "architectures": ["NoSuch"]},
                      "remote_code": {"model_type": "mine", "auto_map": {"AutoModel": "m.M"}}
                      }.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(doc))
        folders[name] = root / name
    (root / "factory.py").write_text("import torch\ndef make():\n"
                                     "    return torch.nn.Linear(2, 2)\n")
    folders["factory"] = root / "factory.py"
    return {**folders, **{f"image_{k}": v for k, v in images.items()}}


def _class_name(name: str) -> str:
    return {"llama": "LlamaForCausalLM", "t5": "T5ForConditionalGeneration",
            "t5_without_start": "T5ForConditionalGeneration",
            "vit": "ViTForImageClassification", "wav2vec2": "Wav2Vec2ForCTC",
            "clip": "CLIPModel"}[name]


REFUSED = [
    ("wav2vec2", ["--text", "x"], "audio model"),
    ("clip", ["--text", "x"], "text together with images"),
    ("unknown", ["--text", "x"], "unknown architecture"),
    ("remote_code", ["--text", "x"], "auto_map"),
    ("llama", ["--image", "{image_png}"], "--image is for vision models"),
    ("llama", ["--text", "x", "--target-text", "y"], "--target-text is for encoder-decoder"),
    ("t5", ["--text", "a", "--text", "b", "--target-text", "y"], "one --target-text per"),
    ("t5", ["--target-text", "y"], "--target-text needs --text"),
    ("t5_without_start", ["--text", "x"], "decoder_start_token_id"),
    ("vit", [], "give --image FILE"),
    ("vit", ["--text", "x", "--image", "{image_png}"], "reads no text"),
    ("vit", ["--image", "{image_not_an_image}"], "not an image"),
    ("vit", ["--image", "{image_gif}"], "give PNG or JPEG"),
    ("vit", ["--image", "{image_png}.missing"], "no such file"),
    ("vit", ["--image", "{image_png}", "--framework", "tensorflow"], "text models only"),
    ("factory", ["--image", "{image_png}"], "apply to Hugging Face folders"),
]


@pytest.mark.parametrize("name, args, message", REFUSED,
                         ids=[f"{n}-{m}" for n, _, m in REFUSED])
def test_what_the_cli_cannot_feed_is_refused_before_a_store_exists(configs, tmp_path, capsys,
                                                                   name, args, message):
    model = f"{configs[name]}:make" if name == "factory" else str(configs[name])
    out = tmp_path / "out.zarr"
    code = main(["trace", model, "-o", str(out), "--no-progress",
                 *(a.format(**configs) for a in args)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("layerscope trace: error:"), err
    assert message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


# -- --generate N ------------------------------------------------------------------------------

def test_generate_traces_each_continued_text_as_one_sample(folders, tmp_path):
    """Greedy generation of 3 tokens for two texts of different lengths: the prompts are
    left-padded to one length, and the stored tokens are what the model generates untraced."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = folders("llama")
    ds = trace(folder, tmp_path / "g.zarr", "--generate", "3", "--text", TEXTS[0],
               "--text", TEXTS[1])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    prompts = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder).generate(
            **prompts, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    prompt = prompts["input_ids"].shape[1]
    np.testing.assert_array_equal(ds["token_id"].values, expected.numpy())
    np.testing.assert_array_equal(ds["token_step"].values[0], [0] * prompt + [1, 2, 3])
    np.testing.assert_array_equal(ds["token_mask"].values[:, :prompt],
                                  prompts["attention_mask"].numpy().astype(bool))
    assert list(ds["input_text"].values) == TEXTS
    assert ds["root@output.logits"].sizes["token"] == prompt + 3


def test_generate_with_an_encoder_decoder_fills_the_decoder_tokens(folders, tmp_path):
    """The texts in the encoder (right-padded), the generated tokens on decoder_token."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = folders("t5")
    ds = trace(folder, tmp_path / "g.zarr", "--generate", "2", "--text", TEXTS[0],
               "--text", TEXTS[1])
    prompts = AutoTokenizer.from_pretrained(folder)(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = AutoModelForSeq2SeqLM.from_pretrained(folder).generate(
            input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
            max_new_tokens=2, do_sample=False)
    np.testing.assert_array_equal(ds["token_id"].values, prompts["input_ids"].numpy())
    np.testing.assert_array_equal(ds["token_mask"].values,
                                  prompts["attention_mask"].numpy().astype(bool))
    assert ds.sizes["decoder_token"] == 3  # the start token and 2 generated
    np.testing.assert_array_equal(ds["decoder_token_id"].values[:, :expected.shape[1]],
                                  expected.numpy())
    np.testing.assert_array_equal(ds["decoder_token_id"].values[:, 0], DECODER_START["t5"])
    np.testing.assert_array_equal(ds["decoder_token_step"].values[0], [0, 1, 2])


def test_generate_samples_with_the_options_given(folders, tmp_path):
    """--sample with --seed, --top-k and --temperature: the stored tokens are what the model
    draws untraced from the same seed and settings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = folders("llama")
    ds = trace(folder, tmp_path / "s.zarr", "--generate", "4", "--text", TEXTS[0], "--text",
               TEXTS[1], "--sample", "--seed", "7", "--top-k", "20", "--temperature", "1.5")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    prompts = tokenizer(TEXTS, return_tensors="pt", padding=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = model.generate(**prompts, max_new_tokens=4, do_sample=True, top_k=20,
                                  temperature=1.5, pad_token_id=tokenizer.pad_token_id)
        greedy = model.generate(**prompts, max_new_tokens=4, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    np.testing.assert_array_equal(ds["token_id"].values, expected.numpy())
    assert not np.array_equal(expected.numpy(), greedy.numpy())  # the draws mattered


@pytest.mark.parametrize("args, message", [
    (["--sample"], "add --generate N"),
    (["--generate", "2", "--top-k", "5"], "add --sample"),
    (["--generate", "2", "--sample", "--top-p", "1.5"], "--top-p 1.5"),
])
def test_sampling_options_out_of_place_are_refused(folders, tmp_path, capsys, args, message):
    out = tmp_path / "out.zarr"
    code = main(["trace", str(folders("llama")), "-o", str(out), "--no-progress",
                 "--text", TEXTS[0], *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("name, args, message", [
    ("bert", ["--text", TEXTS[0]], "cannot generate text"),
    ("t5", ["--text", TEXTS[0], "--target-text", TARGETS[0]], "drop --target-text"),
    ("llama", ["--text", TEXTS[0], "--framework", "tensorflow"], "drop --framework"),
])
def test_generate_refuses_what_it_cannot_continue(folders, tmp_path, capsys, name, args,
                                                  message):
    out = tmp_path / "out.zarr"
    code = main(["trace", str(folders(name)), "-o", str(out), "--no-progress",
                 "--generate", "2", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()

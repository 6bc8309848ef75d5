"""``layerscope estimate`` and ``layerscope.estimate``: the size of a trace of N samples, said
before it runs, against the store a real trace of those N samples writes (within 10%, on
MiniLM through the CLI, GPT-2 generation through the CLI, Llama and GPT-2 and a Flax NNX
model through the Python call); and ``layerscope trace`` refusing, before a store exists, a
trace that does not fit a small tmpfs, unless ``--force``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import layerscope
from layerscope.cli import main
from layerscope.core.info import summarize

from .conftest import TEXTS
from .tmpfs import mounted_tmpfs

TOLERANCE = 0.10


def measured(path: Path) -> dict[str, int]:
    """What a store takes: bytes in files, disk in blocks (folders included), files."""
    stored = allocated = files = 0
    for root, dirs, names in os.walk(path):
        for name in names:
            info = os.lstat(os.path.join(root, name))
            stored, allocated, files = stored + info.st_size, allocated + info.st_blocks * 512, \
                files + 1
        allocated += sum(os.lstat(os.path.join(root, d)).st_blocks * 512 for d in dirs)
    return {"stored": stored, "allocated": allocated + os.lstat(path).st_blocks * 512,
            "files": files}


def stored_arrays(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """Each array of the store (captured variables and labels): its shape and its values'
    bytes, uncompressed (text: its UTF-8 bytes), read with zarr itself."""
    import zarr

    found = {}
    for entry in sorted(path.iterdir()):
        if not (entry / "zarr.json").is_file():
            continue
        array = zarr.open_array(str(entry), mode="r")
        if array.dtype.kind in "biufc":
            nbytes = array.size * array.dtype.itemsize
        else:
            nbytes = sum(len(str(s).encode()) for s in np.asarray(array[:]).reshape(-1))
        found[entry.name] = (tuple(array.shape), nbytes)
    return found


def within(estimated: float, real: float, what: str) -> None:
    assert abs(estimated - real) <= TOLERANCE * real, (
        f"{what}: estimated {estimated:,.0f}, real {real:,.0f} "
        f"({estimated / real - 1:+.1%})")


def assert_matches(estimate: dict[str, Any], path: Path, exact_files: bool = True) -> None:
    """``estimate`` (its JSON form) against the store at ``path``: every array with the
    shape it has, the file count exactly (``exact_files``) and the sizes within 10%."""
    arrays = stored_arrays(path)
    shapes = {v["name"]: tuple(v["shape"]) for v in estimate["variables"]}
    assert shapes == {name: shape for name, (shape, _) in arrays.items()}
    real = measured(path)
    if exact_files:
        assert estimate["files"] == real["files"]
    within(estimate["stored_bytes"], real["stored"], "stored bytes")
    within(estimate["disk_bytes"], real["allocated"], "disk")
    within(estimate["raw_bytes"], sum(n for _, n in arrays.values()), "uncompressed bytes")
    # the captured variables alone: what `layerscope info` reports
    info = summarize(path)
    captured = [v for v in estimate["variables"] if not v["coordinate"]]
    assert {v["name"] for v in captured} == {v.name for v in info.variables}
    within(sum(v["stored_bytes"] for v in captured), info.stored_bytes or 0, "info's stored")
    assert sum(v["raw_bytes"] for v in captured) == info.raw_bytes  # exact: shapes alone


def cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code = main(argv + ["--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == (0 if doc["fits"] else 1)
    return doc


def test_minilm_estimate_of_more_samples_than_given_matches_the_trace(tmp_path, capsys):
    """Six texts given, 27 samples asked: batches of 8 with a partly filled last chunk."""
    given = tmp_path / "six.txt"
    given.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "run.zarr"
    doc = cli_json(["estimate", "minilm", "--text-file", str(given), "--samples", "27",
                    "-o", str(out)], capsys)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["six.txt"]  # nothing written
    assert doc["samples"] == 27 and doc["batch_size"] == 8 and doc["probe_samples"] == 2
    assert doc["token_note"].startswith("the longest of the 6 texts given")
    assert doc["where"] == str(tmp_path) and doc["free_bytes"] > 0
    many = tmp_path / "many.txt"
    many.write_text("\n".join((TEXTS * 5)[:27]) + "\n")
    assert main(["trace", "minilm", "--text-file", str(many), "-o", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("estimate: 27 samples take about ")  # trace checked it first
    assert set(doc["token_lengths"].values()) == {layerscope.open_trace(out).sizes["token"]}
    assert_matches(doc, out)


def test_generate_estimate_matches_the_trace(tmp_path, capsys, minilm_folder):
    """GPT-2 from a config (MiniLM's tokenizer), --generate: the prompt plus N new tokens."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=4,
                               n_positions=64, bos_token_id=101, eos_token_id=102)
                    ).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy(minilm_folder / name, folder / name)
    texts = [arg for text in TEXTS for arg in ("--text", text)]
    out = tmp_path / "gen.zarr"
    doc = cli_json(["estimate", str(folder), *texts, "--generate", "6", "--batch-size", "4",
                    "-o", str(out)], capsys)
    assert "6 generated" in doc["token_note"]
    assert main(["trace", str(folder), *texts, "--generate", "6", "--batch-size", "4",
                 "-o", str(out), "--no-progress"]) == 0
    # a traced generate() chunks its variables at its block length (written as the steps
    # come), which the estimate's layout does not model yet: its file count differs
    assert_matches(doc, out, exact_files=False)


VOCABULARY = 4096  # wide enough that few tokens of the test's batches repeat (see below)


def causal_lm(name: str) -> Any:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name == "llama":
        config = tf.LlamaConfig(vocab_size=VOCABULARY, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)
        return tf.LlamaForCausalLM(config).eval()
    config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCABULARY, n_positions=64,
                           bos_token_id=1, eos_token_id=2)
    return tf.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_python_estimate_from_one_batch_matches_five(tmp_path, name):
    """Tensors: the estimate of 40 samples from one batch of 8, against five batches of 8
    (left padding of different widths: some attention maps compress, some do not). The small
    variables are gathered, all 40 samples in one chunk; token ids drawn from a vocabulary of
    a hundred would repeat rows there (the first layer's projections of one token), which
    compress better than the probe can see."""
    import torch

    model = causal_lm(name)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for number in range(5):
        ids = torch.randint(3, VOCABULARY, (8, 24), generator=generator)
        mask = torch.ones_like(ids)
        mask[: number + 1, : 3 * number] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    out = tmp_path / "run.zarr"
    estimate = layerscope.estimate(model, batches[0], 40, path=out)
    assert estimate.samples == 40 and estimate.batch_size == 8 and estimate.fits
    assert estimate.token_lengths["token"] == 24 and "probe's" in estimate.token_note
    assert not out.exists()
    layerscope.capture(model, batches, out)
    assert_matches(estimate.to_json(), out)
    # a broadcast tensor (positions) is skipped by the trace, and so by the 2-sample probe
    assert not set(layerscope.open_trace(out).attrs["skipped"]) & {
        v.name for v in estimate.variables}


@pytest.mark.parametrize(("name", "asked"), [
    ("llama", {"reduce": ["mean", "topk(4)"]}),
    ("gpt2", {"positions": "last", "kinds": ("output",)}),
])
def test_python_estimate_of_positions_and_reductions_matches_the_trace(tmp_path, name, asked):
    """The estimate of a trace that stores reductions or chosen tokens is that trace's: every
    variable with its reduced shape (a reduction or token choice the estimate left out
    would show as whole tensors here), the sizes within 10%."""
    import torch

    model = causal_lm(name)
    generator = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(3, VOCABULARY, (4, 16), generator=generator),
                "attention_mask": torch.ones(4, 16, dtype=torch.int64)} for _ in range(3)]
    out = tmp_path / "run.zarr"
    estimate = layerscope.estimate(model, batches[0], 12, path=out, **asked)
    whole = layerscope.estimate(model, batches[0], 12, path=out,
                                kinds=asked.get("kinds"))
    assert estimate.raw_bytes < whole.raw_bytes / 2
    layerscope.capture(model, batches, out, **asked)
    assert_matches(estimate.to_json(), out)


def test_cli_estimate_takes_positions_reductions_and_kinds_with_steps_as_trace_does(
        tmp_path, capsys):
    """``layerscope estimate`` reads --positions, --reduce and a kind with steps as
    ``layerscope trace`` does, and refuses one it cannot read before the model loads."""
    texts = [arg for text in TEXTS[:3] for arg in ("--text", text)]
    asked = ["--kinds", "output:topk(hidden,8),attention", "--positions", "last"]
    out = tmp_path / "run.zarr"
    doc = cli_json(["estimate", "minilm", *texts, *asked, "-o", str(out)], capsys)
    kinds = {v["name"].split("@", 1)[1] for v in doc["variables"] if not v["coordinate"]}
    assert {"attention:last(query)", "output:topk(hidden,8)"} <= kinds
    assert all(":" in kind for kind in kinds)  # no whole tensor
    assert main(["trace", "minilm", *texts, *asked, "-o", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert_matches(doc, out)
    for bad, said in ((["--reduce", "bogus"], "unknown reduction 'bogus'"),
                      (["--positions", "5:2"], "'slice(5:2)': a slice takes")):
        assert main(["estimate", "minilm", *texts, *bad, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert said in err and "loading" not in err


def test_flax_nnx_estimate_matches_the_trace(tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False,
                                               rngs=rngs)
            self.mlp = nnx.Linear(32, 128, rngs=rngs)
            self.out = nnx.Linear(128, 32, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            x = x + self.attn(x)
            return x + self.out(nnx.relu(self.mlp(x)))

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed = nnx.Embed(50, 32, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(2)])

        def __call__(self, ids: Any) -> Any:
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return x

    model = Model(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(0, 50, (6, 20))) for _ in range(4)]
    out = tmp_path / "nnx.zarr"
    estimate = layerscope.estimate(model, batches[0], 24, path=out)
    assert estimate.samples == 24 and estimate.batch_size == 6
    layerscope.capture(model, batches, out)
    assert_matches(estimate.to_json(), out)


def test_bad_sample_counts_are_refused():
    import torch

    model = torch.nn.Linear(4, 4)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(layerscope.LayerscopeError, match="n_samples must be a whole"):
            layerscope.estimate(model, torch.zeros(2, 4), bad)


@pytest.fixture()
def small_tmpfs(tmp_path):
    with mounted_tmpfs(tmp_path / "tmpfs", "5m") as folder:
        yield folder


def test_trace_refuses_what_does_not_fit_and_force_overrides(small_tmpfs, capsys):
    """The demo (every MiniLM module, 4 texts: about 15 MB) on a 5 MB tmpfs."""
    out = small_tmpfs / "run.zarr"
    assert main(["trace", "minilm", "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    free = shutil.disk_usage(small_tmpfs).free
    assert f"is free at {small_tmpfs}" in err and "--force" in err and "MB on disk" in err, err
    assert os.listdir(small_tmpfs) == []  # refused before the store was created
    doc = cli_json(["estimate", "minilm", "-o", str(out)], capsys)
    assert not doc["fits"] and doc["free_bytes"] == free and doc["disk_bytes"] > free

    # what fits is traced
    small = small_tmpfs / "small.zarr"
    assert main(["trace", "minilm", "-o", str(small), "--capture", "encoder.layer.0.attention.self",
                 "--kinds", "attention", "--no-progress"]) == 0
    assert layerscope.open_trace(small).attrs["status"] == "complete"
    shutil.rmtree(small)

    # --force: the trace starts (and, as the estimate said, runs out of room)
    assert main(["trace", "minilm", "-o", str(out), "--no-progress", "--force"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--force" not in err, err
    assert (out / "zarr.json").is_file()


def test_the_probe_leaves_a_model_in_training_mode_as_it_was():
    """BatchNorm's running statistics and the random numbers dropout draws: a trace after an
    estimate sees the model a trace without one would."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Dropout(0.5)).train()
    x = torch.randn(6, 4) * 3
    before = {name: value.clone() for name, value in model.state_dict().items()}
    generator = torch.random.get_rng_state()
    layerscope.estimate(model, x, 60)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert torch.equal(torch.random.get_rng_state(), generator)
    with torch.no_grad():
        model(x)  # without the restore, the probe's pass would be a second one like this
    assert not torch.equal(before["1.running_mean"], model.state_dict()["1.running_mean"])


def test_the_probe_leaves_a_flax_nnx_model_as_it_was():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class Normed(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.dense = nnx.Linear(4, 8, rngs=rngs)
            self.norm = nnx.BatchNorm(8, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return self.drop(self.norm(self.dense(x)))

    def values(model: Any) -> list[np.ndarray]:
        return [np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(
            leaf.dtype, jax.dtypes.prng_key) else leaf) for leaf in jax.tree.leaves(
            nnx.state(model))]

    model = Normed(nnx.Rngs(0, dropout=1))
    x = jnp.ones((6, 4)) * 3
    before = values(model)
    layerscope.estimate(model, x, 60)
    after = values(model)
    assert len(before) == len(after)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    model(x)  # without the restore, the probe's pass would be a second one like this
    assert not all(np.array_equal(a, b) for a, b in zip(before, values(model), strict=True))


def test_one_shot_iterators_are_refused_and_the_cli_reads_a_factory_generator(tmp_path, capsys):
    import torch

    model = torch.nn.Linear(4, 4)
    with pytest.raises(layerscope.LayerscopeError, match="one-shot iterator: pass a list"):
        layerscope.estimate(model, iter([torch.zeros(2, 4)]))
    factory = tmp_path / "make.py"
    factory.write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return {'model': torch.nn.Linear(4, 4),\n"
        "            'inputs': (torch.randn(2, 4) for _ in range(3))}\n")
    out = tmp_path / "run.zarr"
    assert main(["trace", f"{factory}:make", "-o", str(out), "--no-progress"]) == 0
    assert "estimate: 6 samples take about" in capsys.readouterr().out
    assert layerscope.open_trace(out).sizes["batch"] == 6  # the estimate used none of them up


def test_chunk_rows_each_batch_writes_are_counted_without_listing_the_batches():
    """The manifests list every chunk a batch writes; counted in closed form (a trace of
    10**12 samples is estimated at once), checked here against counting them one by one."""
    from layerscope._estimate.layout import Batches

    def one_by_one(sizes: list[int], rows: int) -> int:
        start, pairs = 0, 0
        for size in sizes:
            pairs += (start + size - 1) // rows - start // rows + 1
            start += size
        return pairs

    rng = np.random.default_rng(0)
    for _ in range(300):
        samples, size, rows = (int(n) for n in rng.integers(1, 60, 3))
        uniform = [size] * (samples // size) + [samples % size] * bool(samples % size)
        assert Batches.uniform(samples, size).chunk_rows_written(rows) == one_by_one(uniform, rows)
        ragged = [int(n) for n in rng.integers(1, 9, int(rng.integers(1, 12)))]
        assert Batches.of(ragged).chunk_rows_written(rows) == one_by_one(ragged, rows)
    assert Batches.uniform(10**12, 8).chunk_rows_written(8) == 10**12 // 8


@pytest.mark.parametrize("in_blocks", [False, True])
def test_the_estimate_gathers_small_variables_as_the_writer_does(in_blocks):
    """40 small variables gather (chunks of several batches); the blocks a traced generate()
    writes never do (pieces are never gathered), and do not count towards gathering."""
    from layerscope._estimate.layout import Batches, gathered_batches
    from layerscope._estimate.probe import Probe, ProbedArray
    from layerscope.core.gather import GatherPolicy

    def array(name: str, blocks: bool) -> ProbedArray:
        return ProbedArray(name, ("batch", "token", "hidden"), (16, 64), 4, False, False, True,
                           2, (), 0, 0, 0.0, blocks)

    arrays = tuple(array(f"v{i}", in_blocks) for i in range(40)) + (array("label", False),)
    probe = Probe(arrays, 0, True, 2, 0.0)
    gathered = gathered_batches(probe, Batches.uniform(400, 4), GatherPolicy())
    if in_blocks:
        assert gathered == {}  # one countable small variable: too few to gather
    else:
        assert set(gathered) == {a.name for a in arrays} and set(gathered.values()) == {16}

"""layerscope.diff: pairing, transposition by dim role, streaming comparison, CLI exit codes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import layerscope
from layerscope.cli import main as cli_main
from layerscope.core import LayerscopeError, Selection, StoreOptions
from layerscope.core.diff import DiffOptions, diff, plan_blocks
from layerscope.core.format import new_group_attrs
from layerscope.core.namemap import NameMapError, load_name_map
from layerscope.core.recorder import Recorder
from layerscope.core.store import open_group_for_writing
from layerscope.core.writer import TraceWriter

# -- a tiny torch model with numbered blocks ------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(self.norm(x))))


class Tiny(nn.Module):
    def __init__(self, depth: int = 4, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Renamed(nn.Module):
    """The same computation as Tiny under other module names (``layer_1`` ... counted from 1)."""

    def __init__(self, tiny: Tiny) -> None:
        super().__init__()
        self.stem = tiny.embed
        for i, block in enumerate(tiny.blocks):
            setattr(self, f"layer_{i + 1}", block)
        self.depth = len(tiny.blocks)
        self.classifier = tiny.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(self.depth):
            x = getattr(self, f"layer_{i + 1}")(x)
        return self.classifier(x)


def _inputs(batches: int = 2, size: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(size, 5, 8, generator=gen) for _ in range(batches)]


def _capture(model: nn.Module, path, inputs=None, **kwargs):
    torch.manual_seed(0)
    return layerscope.capture(model.eval(), inputs or _inputs(), path, mode="w", **kwargs)


@pytest.fixture(scope="module")
def model() -> Tiny:
    torch.manual_seed(1)
    return Tiny().eval()


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("diff") / "a.zarr"
    _capture(model, path)
    return path


def _perturbed_trace(model: Tiny, layer: int, path):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.blocks[layer].up.weight[0, 0] += 0.25
    _capture(broken, path)
    return path


# -- identical, perturbed ------------------------------------------------------------------


def test_identical_traces_agree_exactly_and_exit_zero(reference, capsys):
    result = diff(reference, reference)
    assert result.passed and result.exit_code == 0 and result.first_divergence is None
    names = layerscope.captured_names(layerscope.open_trace(reference))
    assert [p.a for p in result.pairs] == names and not result.unmatched_a
    for pair in result.pairs:
        assert pair.max_abs == 0.0 and pair.max_rel == 0.0 and pair.n_bad == 0
        assert pair.cosine == pytest.approx(1.0, abs=1e-12)
    assert cli_main(["diff", str(reference), str(reference)]) == 0
    out = capsys.readouterr().out
    assert "all compared pairs agree" in out and f"{len(names)} pairs compared" in out


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_weight_perturbed_in_layer_k_is_the_first_divergence(model, reference, tmp_path,
                                                              layer, capsys):
    other = _perturbed_trace(model, layer, tmp_path / "b.zarr")
    result = diff(reference, other)
    first = result.first_divergence
    assert first is not None and first.layer == layer
    assert first.a == f"blocks.{layer}.up@output"  # the perturbed Linear itself
    # everything computed before the perturbed module is bit-identical
    before = [p for p in result.pairs if p.order < first.order]
    assert before and all(p.max_abs == 0.0 for p in before)
    assert first.max_abs > 0.1 and first.cosine < 1.0
    assert cli_main(["diff", str(reference), str(other)]) == 1
    out = capsys.readouterr().out
    assert f"first divergence: blocks.{layer}.up@output" in out


def test_json_output_and_plot(model, reference, tmp_path, capsys):
    other = _perturbed_trace(model, 1, tmp_path / "b.zarr")
    plot = tmp_path / "errors.png"
    assert cli_main(["diff", str(reference), str(other), "--json", "--plot", str(plot)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] is False and doc["first_divergence"]["layer"] == 1
    assert doc["failed"] == sum(1 for p in doc["pairs"] if not p["passed"])
    assert doc["frameworks"] == ["torch", "torch"]
    assert plot.stat().st_size > 5000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_tolerance_decides_pass_fail(model, reference, tmp_path):
    other = _perturbed_trace(model, 2, tmp_path / "b.zarr")
    strict = diff(reference, other)
    worst = max(p.max_abs for p in strict.pairs)
    loose = diff(reference, other, atol=worst * 1.01, rtol=0.0)
    assert not strict.passed and loose.passed
    with pytest.raises(LayerscopeError, match="rtol"):
        diff(reference, other, rtol=-1.0)


# -- name maps -----------------------------------------------------------------------------


def test_map_with_layer_capture_pairs_renamed_modules(model, reference, tmp_path):
    other = tmp_path / "renamed.zarr"
    _capture(Renamed(model), other)
    name_map = {
        "embed": "stem",
        "blocks.{n}": "layer_{n+1}",
        "blocks.{n}.*": "layer_{n+1}.*",
        "head@output": "classifier@output",
    }
    result = diff(reference, other, name_map=name_map)
    assert result.passed and result.method == "map"
    pairs = {p.a: p.b for p in result.pairs}
    assert pairs["blocks.0@output"] == "layer_1@output"
    assert pairs["blocks.3.down@output"] == "layer_4.down@output"
    assert pairs["embed@output"] == "stem@output"
    assert all(p.max_abs == 0.0 for p in result.pairs)
    # the root output has a counterpart nobody mapped: listed on both sides, not compared
    assert result.unmatched_a == ("root@output",) and result.unmatched_b == ("root@output",)


def test_map_file_json_and_yaml(model, reference, tmp_path):
    other = tmp_path / "renamed.zarr"
    _capture(Renamed(model), other)
    rules = {"blocks.{n}.*@output": "layer_{n+1}.*@output"}
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps({"description": "tiny", "map": rules}))
    as_yaml = tmp_path / "map.yaml"
    as_yaml.write_text("blocks.{n}.*@output: layer_{n+1}.*@output\n")
    for path in (as_json, as_yaml):
        result = diff(reference, other, name_map=path)
        assert result.passed and len(result.pairs) == 4 * 4  # norm, up, act, down per block
        assert result.name_map == str(path)


def test_map_that_matches_nothing_is_a_clear_error(reference, tmp_path, capsys):
    with pytest.raises(NameMapError, match="pairs no variables: none of its rules matches"):
        diff(reference, reference, name_map={"encoder.layer.{n}": "transformer_layer_{n}"})
    with pytest.raises(NameMapError, match="points? at names B lacks|target"):
        diff(reference, reference, name_map={"blocks.{n}": "nowhere_{n}"})
    bad = tmp_path / "bad.json"
    bad.write_text('{"encoder.{n}@output": "x.{n}@output"}')
    assert cli_main(["diff", str(reference), str(reference), "--map", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "pairs no variables" in err and "blocks." in err  # shows names A does have


@pytest.mark.parametrize("rules, message", [
    ({"a.{n}": "b.{m}"}, "not captured on the left"),
    ({"a@output": "b"}, "both sides name variables"),
    ({"a.*": "b.*.*"}, "more '\\*'"),
    ({}, "no rules"),
])
def test_malformed_maps_are_rejected(rules, message):
    with pytest.raises(NameMapError, match=message):
        load_name_map(rules)


def test_missing_map_file_is_bad_input(reference, capsys):
    assert cli_main(["diff", str(reference), str(reference), "--map", "/no/such/map.json"]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- automatic pairing by order, kind and shape --------------------------------------------


def test_automatic_pairing_by_execution_order(model, reference, tmp_path):
    other = tmp_path / "renamed.zarr"
    _capture(Renamed(model), other)
    result = diff(reference, other)
    assert result.method == "auto" and result.passed
    pairs = {p.a: p.b for p in result.pairs}
    assert pairs["blocks.2.up@output"] == "layer_3.up@output"
    assert pairs["head@output"] == "classifier@output"
    assert not result.unmatched_a and not result.unmatched_b


def test_nothing_to_pair_automatically_is_an_error(reference, tmp_path):
    path = tmp_path / "other.zarr"
    recorder = _recorder(path)
    recorder.begin_pass(6)
    recorder.put("x", "output", np.zeros((6, 7), np.float32), ("batch", "channel"))
    recorder.end_pass()
    recorder.close()
    with pytest.raises(LayerscopeError, match="give a name map"):
        diff(reference, path)


# -- transposition by role, NaN, sample counts (traces written through the recorder) -------


def _recorder(path) -> Recorder:
    attrs = new_group_attrs("numpy", "0", {"class": "test"}, Selection().to_json())
    group, _ = open_group_for_writing(path, "w", attrs)
    return Recorder(TraceWriter(group, StoreOptions(mode="w")), Selection(), "numpy")


def _write(path, tensors, batches=1):
    """tensors: list of (site, array with all samples, roles); written in ``batches`` passes."""
    recorder = _recorder(path)
    total = tensors[0][1].shape[0]
    step = total // batches
    for start in range(0, total, step):
        recorder.begin_pass(step)
        for site, array, roles in tensors:
            recorder.put(site, "output", array[start:start + step], roles)
        recorder.end_pass()
    recorder.close()
    return path


def test_channels_last_is_transposed_by_role(tmp_path):
    rng = np.random.default_rng(0)
    nchw = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    a = _write(tmp_path / "a.zarr", [("conv", nchw, ("batch", "channel", "height", "width"))])
    b = _write(tmp_path / "b.zarr", [("conv2d", nchw.transpose(0, 2, 3, 1).copy(),
                                       ("batch", "height", "width", "channel"))])
    result = diff(a, b)
    (pair,) = result.pairs
    assert pair.b == "conv2d@output" and pair.max_abs == 0.0 and pair.passed
    assert "transposed" in pair.note
    # the same data NOT transposed (a layout bug) is caught
    c = _write(tmp_path / "c.zarr", [("conv2d", nchw.reshape(4, 5, 6, 3),
                                       ("batch", "height", "width", "channel"))])
    assert not diff(a, c).passed


def test_nan_and_inf_handling(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    left = base.copy()
    left[1, 2] = np.nan
    left[2, 3] = np.inf
    a = _write(tmp_path / "a.zarr", [("x", left, ("batch", "hidden"))])
    assert diff(a, a).passed  # NaN where the other has NaN agrees
    right = left.copy()
    right[1, 2] = 1.0
    b = _write(tmp_path / "b.zarr", [("x", right, ("batch", "hidden"))])
    (pair,) = diff(a, b).pairs
    assert not pair.passed and pair.n_bad == 1 and pair.max_abs == np.inf
    assert pair.worst == {"batch": 1, "hidden": 2}


def test_different_sample_counts_compare_the_common_prefix(tmp_path):
    data = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    a = _write(tmp_path / "a.zarr", [("x", data, ("batch", "hidden"))], batches=2)
    b = _write(tmp_path / "b.zarr", [("x", data[:4], ("batch", "hidden"))])
    result = diff(a, b)
    assert result.passed and result.pairs[0].size == 4 * 4
    assert any("compared the first 4" in note for note in result.notes)


def test_shape_mismatch_is_reported_not_raised(tmp_path):
    a = _write(tmp_path / "a.zarr", [("x", np.zeros((2, 4), np.float32), ("batch", "hidden"))])
    b = _write(tmp_path / "b.zarr", [("x", np.zeros((2, 5), np.float32), ("batch", "hidden"))])
    result = diff(a, b)
    assert result.pairs[0].status == "mismatch" and not result.passed
    assert "shapes differ" in result.pairs[0].note


# -- streaming -----------------------------------------------------------------------------


def test_streaming_reads_block_by_block_with_the_same_result(tmp_path):
    rng = np.random.default_rng(2)
    left = rng.standard_normal((64, 16, 32)).astype(np.float32)
    right = left + rng.standard_normal(left.shape).astype(np.float32) * 1e-3
    roles = ("batch", "token", "hidden")
    a = _write(tmp_path / "a.zarr", [("x", left, roles)], batches=8)
    b = _write(tmp_path / "b.zarr", [("x", right, roles)], batches=8)
    small = diff(a, b, options=DiffOptions(block_bytes=1024))
    whole = diff(a, b, options=DiffOptions(block_bytes=1 << 30))
    (ps,), (pw,) = small.pairs, whole.pairs
    sample = 16 * 32 * 4
    assert ps.blocks == left.size * 4 // 1024 and pw.blocks == 1
    assert 1024 < sample  # one sample is larger than the budget: split inside the sample
    delta = np.abs(left.astype(np.float64) - right)
    cosine = np.vdot(left.astype(np.float64), right) / (
        np.linalg.norm(left.astype(np.float64)) * np.linalg.norm(right.astype(np.float64)))
    for pair in (ps, pw):
        assert pair.max_abs == pytest.approx(delta.max(), rel=0, abs=0)
        assert pair.cosine == pytest.approx(cosine, rel=1e-12)
        tol = DiffOptions()
        assert pair.n_bad == int(np.count_nonzero(delta > tol.atol + tol.rtol * np.abs(right)))
        assert pair.worst == dict(zip(roles, np.unravel_index(delta.argmax(), delta.shape),
                                      strict=True))


@pytest.mark.parametrize("shape, chunks, budget", [
    ((10, 7), (4, 7), 64), ((10, 7), (4, 7), 10_000), ((3, 5, 9), (1, 5, 9), 40),
    ((5,), (2,), 8), ((0, 4), (1, 4), 64),
])
def test_block_plan_covers_every_element_once_within_budget(shape, chunks, budget):
    seen = np.zeros(shape, np.int64)
    chunk_bytes = 4 * int(np.prod(chunks))
    for block in plan_blocks(shape, chunks, 4, budget):
        seen[block] += 1
        assert 4 * seen[block].size <= max(budget, chunk_bytes) or seen[block].size <= 1
    assert (seen == 1).all()


def test_heads_split_on_one_side_are_merged_in_c_order(tmp_path):
    rng = np.random.default_rng(3)
    merged = rng.standard_normal((4, 5, 12)).astype(np.float32)
    a = _write(tmp_path / "a.zarr", [("q", merged, ("batch", "token", "hidden"))])
    b = _write(tmp_path / "b.zarr", [("q_dense", merged.reshape(4, 5, 3, 4),
                                       ("batch", "token", "head", "axis3"))])
    (pair,) = diff(a, b, name_map={"q@output": "q_dense@output"}, options=DiffOptions(
        block_bytes=1024)).pairs
    assert pair.passed and pair.max_abs == 0.0 and "reshaped" in pair.note
    # heads in the other order (head-minor) are not the same tensor: caught
    c = _write(tmp_path / "c.zarr", [("q_dense", merged.reshape(4, 5, 4, 3).swapaxes(2, 3).copy(),
                                       ("batch", "token", "head", "axis3"))])
    assert not diff(a, c, name_map={"q@output": "q_dense@output"}).passed

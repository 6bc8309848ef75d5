"""Damaged metadata: each defect is a typed error in Python and one line on stderr with exit
status 2 in `layerscope info` and `layerscope verify`; no shape is trusted before the chunk
files it claims are seen, so huge claimed shapes are refused at once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import layerscope
from layerscope import DamagedStoreError, LayerscopeError, SchemaError, StoreError
from layerscope.cli import main

from .damage import edit_root, make_trace, set_root

HUGE = 10**8


def _attr(name, value):
    return lambda path: edit_root(path, lambda doc: doc["attributes"].__setitem__(name, value))


def _array(name, edit):
    return lambda path: edit_root(
        path, lambda doc: edit(doc["consolidated_metadata"]["metadata"][name]))


def _huge(doc):
    doc["attributes"]["committed_samples"] = HUGE
    for meta in doc["consolidated_metadata"]["metadata"].values():
        meta["shape"][0] = HUGE


def _huge_tokens(doc):
    for meta in doc["consolidated_metadata"]["metadata"].values():
        if len(meta["shape"]) > 1:
            meta["shape"][1] = HUGE


def _chunk_shape(value):
    return _array("block.0@output", lambda meta: meta["chunk_grid"]["configuration"]
                  .__setitem__("chunk_shape", value))


DEFECTS = {
    "null": (lambda path: set_root(path, "null"), DamagedStoreError, "not a JSON object"),
    "garbage": (lambda path: set_root(path, "\x00garbage{"), DamagedStoreError, "not JSON"),
    "a list": (lambda path: set_root(path, "[1, 2]"), DamagedStoreError, "not a JSON object"),
    "attributes null": (lambda path: edit_root(path, lambda d: d.__setitem__("attributes", None)),
                        DamagedStoreError, "attributes"),
    "schema_version '1'": (_attr("schema_version", "1"), SchemaError, "schema_version"),
    "schema_version 1.5": (_attr("schema_version", 1.5), SchemaError, "schema_version"),
    "status 7": (_attr("status", 7), DamagedStoreError, "status"),
    "negative committed_samples": (_attr("committed_samples", -4), DamagedStoreError,
                                   "committed_samples"),
    "committed_batches '3'": (_attr("committed_batches", "3"), DamagedStoreError,
                              "committed_batches"),
    "model a string": (_attr("model", "x"), DamagedStoreError, "model"),
    "more samples than rows": (_attr("committed_samples", 16), DamagedStoreError, "rows"),
    "zero chunk size": (_chunk_shape([0, 5, 8]), DamagedStoreError, "chunk shape"),
    "negative chunk size": (_chunk_shape([4, -5, 8]), DamagedStoreError, "chunk shape"),
    "chunk shape too short": (_chunk_shape([4, 5]), DamagedStoreError, "chunk shape"),
    "shape disagrees with rows": (_array("block.0@output", lambda m: m.__setitem__("shape",
                                                                                   [11, 5, 8])),
                                  DamagedStoreError, "11 rows"),
    "a pickle codec": (_array("block.0@output", lambda m: m["codecs"].insert(0, {"name":
                                                                             "pickle"})),
                       DamagedStoreError, "codecs"),
    "no consolidated metadata": (lambda path: edit_root(path, lambda d: d.pop(
        "consolidated_metadata")), DamagedStoreError, "consolidated"),
    "huge consistent shapes": (lambda path: edit_root(path, _huge), DamagedStoreError,
                               "absent"),
    "huge trailing shapes": (lambda path: edit_root(path, _huge_tokens), DamagedStoreError,
                             "chunk files"),
    "root zarr.json deleted": (lambda path: os.remove(path / "zarr.json"), StoreError,
                               "zarr.json"),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine") / "t.zarr"
    make_trace(path)
    return path


@pytest.fixture()
def trace(pristine, tmp_path):
    copy = tmp_path / "t.zarr"
    shutil.copytree(pristine, copy)
    return copy


@pytest.mark.parametrize("name", list(DEFECTS))
def test_each_defect_is_one_typed_error(trace, name, capsys):
    damage, kind, words = DEFECTS[name]
    damage(trace)
    with pytest.raises(kind, match=words) as info:
        layerscope.open_trace(trace)
    assert str(trace) in str(info.value) and "\n" not in str(info.value)
    for command in ("info", "verify"):
        assert main([command, str(trace)]) == 2
        out, err = capsys.readouterr()
        assert err.startswith(f"layerscope {command}: error: ") and err.count("\n") == 1
        assert words in err and out == ""


@pytest.mark.parametrize("name", ["null", "schema_version '1'", "negative committed_samples",
                                  "zero chunk size", "huge consistent shapes"])
def test_the_cli_prints_no_traceback(trace, name):
    DEFECTS[name][0](trace)
    for command in ("info", "verify"):
        run = subprocess.run([sys.executable, "-m", "layerscope", command, str(trace)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        assert run.stderr.count("\n") == 1 and run.stdout == ""


def test_huge_shapes_are_refused_before_anything_is_built(trace):
    import tracemalloc

    edit_root(trace, _huge)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(DamagedStoreError):
        layerscope.open_trace(trace)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - start < 2 and peak < 16 << 20


def test_a_variables_own_zarr_json(trace, capsys):
    """Deleted: reads still work (the root holds its metadata) and verify names it.
    Disagreeing with the root: the array's reads refuse, verify names it."""
    os.remove(trace / "block.0@output" / "zarr.json")
    ds = layerscope.open_trace(trace)
    assert ds["block.0@output"].load().shape == (12, 5, 8)
    assert main(["info", str(trace)]) == 0
    capsys.readouterr()
    assert main(["verify", str(trace)]) == 1
    assert "block.0@output has no zarr.json" in capsys.readouterr().out
    shutil.copyfile(trace / "token_id" / "zarr.json", trace / "block.0@output" / "zarr.json")
    with pytest.raises(DamagedStoreError, match="disagrees"):
        layerscope.open_trace(trace)["block.0@output"].load()
    problems = layerscope.verify(trace).problems
    assert any("block.0@output" in p and "disagrees" in p for p in problems)


def test_not_a_store(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "missing", tmp_path / "file", tmp_path):
        with pytest.raises(LayerscopeError):
            layerscope.open_trace(target)
        assert main(["verify", str(target)]) == 2
        assert capsys.readouterr().err.count("\n") == 1


def test_a_damaged_chunk_key_separator_is_not_read_as_fill_values(tmp_path):
    """One byte of the root's consolidated metadata ('.' to '/' in the chunk key separator)
    sent reads to chunk files that do not exist, which read as fill values without a word."""
    import json

    from ..core.test_writer import make_recorder

    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    recorder.begin_pass(2)
    recorder.put("a", "output", np.ones((2, 3), np.float32), ("batch", "hidden"))
    recorder.end_pass()
    recorder.close()
    root = path / "zarr.json"
    doc = json.loads(root.read_text())
    encoding = doc["consolidated_metadata"]["metadata"]["a@output"]["chunk_key_encoding"]
    encoding["configuration"]["separator"] = "/"
    root.write_text(json.dumps(doc))
    # whichever read comes first says so: the array's own zarr.json disagrees with the root,
    # or the manifest lists a chunk the damaged key encoding cannot name
    with pytest.raises(layerscope.DamagedStoreError,
                       match="chunk_key_encoding|no chunk of the arrays the root"):
        layerscope.open_trace(path)["a@output"].load()

"""The CLI: trace and info work; each kind of bad input is one line on stderr and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import layerscope
from layerscope.cli import main


@pytest.fixture(scope="module")
def cli_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "t.zarr"
    texts = tmp_path_factory.mktemp("texts") / "texts.txt"
    texts.write_text("first sentence here\n\nsecond one\nthird\n")
    code = main(["trace", "minilm", "-o", str(path), "--text-file", str(texts),
                 "--capture", "encoder.layer.*", "--batch-size", "2", "--no-progress"])
    assert code == 0
    return path


def test_trace_writes_a_trace_of_the_texts(cli_trace):
    ds = layerscope.open_trace(cli_trace)
    assert list(ds["input_text"].values) == ["first sentence here", "second one", "third"]
    assert ds.attrs["committed_batches"] == 2
    assert "encoder.layer.0.attention.self@attention" in ds
    assert "embeddings@output" not in ds  # outside the --capture pattern


def test_info_lists_variables(cli_trace, capsys):
    assert main(["info", str(cli_trace)]) == 0
    out = capsys.readouterr().out
    assert "status     complete" in out
    assert "encoder.layer.0.attention.self@attention" in out
    assert "(batch, head, query, key)" in out
    assert main(["info", str(cli_trace), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_name = {v["name"]: v for v in doc["variables"]}
    var = by_name["encoder.layer.0@output"]
    assert var["shape"][0] == 3 and var["raw_bytes"] == int(np.prod(var["shape"])) * 4
    assert 0 < var["stored_bytes"]


def test_append_adds_batches(cli_trace, tmp_path):
    assert main(["trace", "minilm", "-o", str(cli_trace), "--append", "--text", "more text",
                 "--capture", "encoder.layer.*", "--no-progress", "--max-length", "5"]) == 0
    assert layerscope.open_trace(cli_trace).attrs["committed_batches"] == 3


@pytest.mark.parametrize("argv, message", [
    (["trace", "no-such-model", "-o", "{tmp}/a.zarr", "--text", "x"], "cannot load"),
    (["trace", "minilm", "-o", "{tmp}/a.zarr", "--text-file", "{tmp}/missing.txt"], "no such file"),
    (["trace", "minilm", "-o", "{tmp}/exists", "--text", "x"], "already exists"),
    (["trace", "minilm", "-o", "{tmp}/no/dir/a.zarr", "--text", "x"], "does not exist"),
    (["trace", "nomodule_xyz:make", "-o", "{tmp}/a.zarr"], "cannot import"),
    (["info", "{tmp}/missing.zarr"], "does not exist"),
    (["info", "{tmp}/exists"], "not a Zarr v3 group"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_factory_models(tmp_path, capsys):
    factory = tmp_path / "factory.py"
    factory.write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())\n"
        "    return {'model': model, 'inputs': [torch.ones(2, 3), torch.zeros(2, 3)]}\n"
    )
    out = tmp_path / "f.zarr"
    assert main(["trace", f"{factory}:make", "-o", str(out), "--no-progress"]) == 0
    ds = layerscope.open_trace(out)
    assert ds.attrs["committed_batches"] == 2
    assert ds["1@output"].dims == ("batch", "hidden")


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "layerscope", "--help"], capture_output=True,
                         text=True, check=True)
    for command in ("trace", "info", "render"):
        assert command in out.stdout

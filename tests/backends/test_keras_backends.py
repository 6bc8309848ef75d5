"""Keras 3 on its JAX and PyTorch backends. Keras picks its backend once per process
(``KERAS_BACKEND`` before ``import keras``), so each runs in a subprocess of its own: the
conformance suite (tests/backends/test_conformance_tensorflow.py, whose kit is
backend-neutral), tests/backends/test_keras_any_backend.py (predict, bfloat16, to_numpy),
tests/backends/test_reduce_keras.py (reductions in ``keras.ops``), and
the keras-hub BERT zoo test at batch 3, and on PyTorch the Llama one (its fused attention is
recomputed there, as on JAX; JAX, the slower to run eagerly, is spared it). The BERT trace
must have the same variables, dims, roles and labels on every backend as on TensorFlow here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ..zoo.test_keras_bert import LAYOUT_OUT, layout, trace_bert

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("jax", "torch")
TESTS = ["tests/backends/test_conformance_tensorflow.py",
         "tests/backends/test_keras_any_backend.py",
         "tests/backends/test_reduce_keras.py",
         "tests/zoo/test_keras_bert.py::test_bert_maps_and_hidden_states[3]"]
EXTRA = {"torch": ["tests/zoo/test_keras_llama.py::test_llama_maps_and_hidden_states[3]"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """Both backends' runs, started together: (exit status, output, BERT layout file)."""
    started = {}
    for backend in BACKENDS:
        out = tmp_path_factory.mktemp(f"keras_{backend}") / "bert_layout.json"
        env = {**os.environ, "KERAS_BACKEND": backend, LAYOUT_OUT: str(out),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if backend == "jax":
            # eager Keras on JAX compiles every operation it meets: unoptimised compiles take
            # a third less time, and every check compares values of the same process
            env["XLA_FLAGS"] = " ".join(
                [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
        command = [sys.executable, "-P", "-m", "pytest", "-p", "no:cacheprovider", "-q", *TESTS,
                   *EXTRA.get(backend, [])]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        started[backend] = (process, out)
    done = {}
    for backend, (process, out) in started.items():
        output, _ = process.communicate(timeout=600)
        done[backend] = (process.returncode, output, out)
    return done


@pytest.fixture(scope="module")
def tensorflow_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _, ds, _ = trace_bert(tmp_path_factory.mktemp("keras_tf") / "bert.zarr", 3)
    assert ds.attrs["framework"] == "keras/tensorflow"
    return layout(ds)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_backend_passes_the_suite_and_traces_bert_like_tensorflow(
        runs: dict[str, tuple[int, str, Path]], tensorflow_layout: dict[str, Any],
        backend: str) -> None:
    status, output, out = runs[backend]
    tail = output[-6000:]
    assert status == 0, f"KERAS_BACKEND={backend}:\n{tail}"
    assert " passed" in tail and "skipped" not in tail, tail
    theirs = json.loads(out.read_text())
    assert theirs == tensorflow_layout, sorted(
        name for name in set(theirs) | set(tensorflow_layout)
        if theirs.get(name) != tensorflow_layout.get(name))

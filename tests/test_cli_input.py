"""Bad input to every subcommand: exit status 2, one line on stderr, no traceback, and for
``trace`` no store left behind. Runs in process (``layerscope.cli.main``) except where the
console script itself is the point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import layerscope
from layerscope.cli import main

FACTORY = """
import sys
import torch


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    return {"model": model, "inputs": [torch.ones(2, 3), torch.zeros(2, 3)]}


def boom():
    raise RuntimeError("the factory failed\\non two lines")


def not_a_model():
    return 42


def nothing():
    return None


def leaves():
    sys.exit(3)


number = 7
"""

HUGE = str(10**12)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Model files (good and broken), a trace, and things that are not traces."""
    root = tmp_path_factory.mktemp("cli_input")
    (root / "models.py").write_text(FACTORY)
    (root / "syntax.py").write_text("def make(:\n")
    (root / "raises.py").write_text("raise ImportError('a dependency is missing')\n")
    (root / "exits.py").write_text("import sys\nsys.exit(1)\n")
    (root / "folder.py").mkdir()
    (root / "plain_dir").mkdir()
    (root / "plain.txt").write_text("not a trace\n")
    (root / "no_config").mkdir()
    hf = root / "bad_hf"
    hf.mkdir()
    (hf / "config.json").write_text("{not json")
    trace = root / "good.zarr"
    assert main(["trace", f"{root / 'models.py'}:make", "-o", str(trace), "--no-progress",
                 "--kinds", "output,input"]) == 0
    return {"root": root, "trace": trace}


def call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse ends parse errors with SystemExit(2)
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, argv: list[str]) -> None:
    assert code == 2, (argv, code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    assert lines[0].startswith("layerscope"), (argv, err)


# -- trace -----------------------------------------------------------------------------------

_MODEL = "{root}/models.py:make"
TRACE_CASES = [
    *[[_MODEL, "--batch-size", v] for v in ("0", "-1", HUGE, "x", "1.5")],
    *[[_MODEL, "--max-length", v] for v in ("0", "-1", HUGE, "x", "")],
    [_MODEL, "--capture", "nomatch*"],
    [_MODEL, "--capture", "0", "--capture", "typo*"],
    [_MODEL, "--capture", "0", "--exclude", "0"],
    [_MODEL, "--capture", "0@foo"],
    [_MODEL, "--kinds", "foo"],
    [_MODEL, "--kinds", "grad"],
    [_MODEL, "--kinds", "output.1"],
    [_MODEL, "--framework", "mxnet"],
    [_MODEL, "--text-file", "{root}/missing.txt"],
    [_MODEL, "--text-file", "{root}/plain_dir"],
    ["{root}/models.py:boom"],
    ["{root}/models.py:not_a_model"],
    ["{root}/models.py:nothing"],
    ["{root}/models.py:leaves"],
    ["{root}/models.py:number"],
    ["{root}/models.py:no_such_function"],
    ["{root}/models.py:"],
    ["{root}/missing.py:make"],
    ["{root}/folder.py:make"],
    ["{root}/syntax.py:make"],
    ["{root}/raises.py:make"],
    ["{root}/exits.py:make"],
    ["no_such_module_xyz:make"],
    ["{root}/no_config"],
    ["{root}/bad_hf"],
    ["{root}/plain.txt"],
    ["not-a-model"],
]


@pytest.mark.parametrize("args", TRACE_CASES, ids=lambda a: " ".join(a)[-48:])
def test_bad_trace_input_writes_nothing(files, tmp_path, capsys, args):
    out = tmp_path / "out.zarr"
    argv = ["trace", *(a.format(root=files["root"]) for a in args), "-o", str(out),
            "--no-progress"]
    code, err = call(argv, capsys)
    assert_one_line(code, err, argv)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_output_paths_of_trace(files, tmp_path, capsys):
    model = f"{files['root']}/models.py:make"
    for out in (files["trace"], tmp_path / "missing" / "x.zarr", files["root"] / "plain.txt"):
        argv = ["trace", model, "-o", str(out), "--no-progress"]
        assert_one_line(*call(argv, capsys), argv)
    assert list(tmp_path.iterdir()) == []


def test_a_selection_that_matches_nothing_is_refused_in_python(tmp_path):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    out = tmp_path / "x.zarr"
    with pytest.raises(layerscope.LayerscopeError, match="matches no site.*root, 0"):
        layerscope.trace(model, out, "nomatch*")
    with pytest.raises(layerscope.LayerscopeError, match="use output, input, attention"):
        layerscope.capture(model, torch.ones(1, 3), out, kinds=["foo"])
    with pytest.raises(layerscope.LayerscopeError, match="max_length"):
        layerscope.capture(model, ["text"], out, tokenizer=object(), max_length=-1)
    assert not out.exists()


def test_jax_patterns_are_checked_where_the_sites_are_known(tmp_path):
    """A plain function's named scopes appear only as it runs: its patterns are not refused
    up front (its kinds are); an NNX module lists its sites, so a typo is refused."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    def function(x):
        with jax.named_scope("layers.0"):
            y = jnp.tanh(x)
        return y * 2

    with layerscope.trace(function, tmp_path / "f.zarr", "layers.*", backend="jax") as t:
        t(np.ones((2, 3), np.float32))
    assert list(layerscope.open_trace(tmp_path / "f.zarr").data_vars) == ["layers.0@output"]
    with pytest.raises(layerscope.LayerscopeError, match="kind 'foo'"):
        layerscope.trace(function, tmp_path / "g.zarr", kinds=["foo"], backend="jax")

    class Model(nnx.Module):
        def __init__(self) -> None:
            self.dense = nnx.Linear(3, 4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.dense(x)

    with pytest.raises(layerscope.LayerscopeError, match="'dens' matches no site.*root, dense"):
        layerscope.trace(Model(), tmp_path / "n.zarr", "dens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.zarr"]


# -- info, render, report, diff --------------------------------------------------------------

NOT_TRACES = ["{root}/missing.zarr", "{root}/plain_dir", "{root}/plain.txt"]
RENDER_KINDS = ("attention", "hidden", "activations", "stats")
COMMON_RENDER = [
    *[["--dpi", v] for v in ("0", "-1", "9", "100000", "x")],
    *[["--sample", v] for v in ("-1", "99", HUGE, "x")],
    ["-o", "{out}/picture.gif"],
    ["-o", "{out}/missing/picture.png"],
    ["-o", "{out}"],
]
RENDER_CASES = [
    *[(kind, case) for kind in RENDER_KINDS for case in COMMON_RENDER],
    *[(kind, ["--trace", t]) for kind in RENDER_KINDS for t in NOT_TRACES],
    *[("attention", ["--max-cells", v]) for v in ("0", "-1", HUGE, "x")],
    *[("attention", [o, v]) for o in ("--layer", "--head") for v in ("-1", "x", "99")],
    ("attention", ["--window", "5", "2"]),
    ("attention", ["--window", "-1", "2"]),
    ("attention", ["--view", "nope"]),
    ("hidden", ["--view", "logit-lens"]),
    ("hidden", ["--view", "logit-lens", "--unembedding", "{root}/plain_dir", "--vocab",
                "{root}/plain.txt"]),
    *[("activations", ["--top-k", v]) for v in ("0", "-1", HUGE, "x")],
    *[("activations", [o, v]) for o in ("--neurons", "--layer") for v in ("-1", "x", "99")],
    ("activations", ["--view", "channels"]),
    *[("stats", ["--bins", v]) for v in ("0", "-1", "100000000", "x")],
    ("stats", ["--variable", "nope@output"]),
]


def _render_argv(kind: str, case: list[str], files: dict[str, Path], out: Path) -> list[str]:
    trace, rest = str(files["trace"]), list(case)
    if rest[:1] == ["--trace"]:
        trace, rest = rest[1], rest[2:]
    if "-o" not in rest:
        rest += ["-o", "{out}/picture.png"]
    fill = {"root": files["root"], "out": out}
    return ["render", kind, trace.format(**fill), *(a.format(**fill) for a in rest)]


@pytest.mark.parametrize("kind, case", RENDER_CASES, ids=lambda v: str(v)[-40:])
def test_bad_render_input(files, tmp_path, capsys, kind, case):
    argv = _render_argv(kind, case, files, tmp_path)
    assert_one_line(*call(argv, capsys), argv)
    assert list(tmp_path.iterdir()) == []


REPORT_CASES = [
    *[["--sample", v] for v in ("-1", "99", "x")],
    *[[o, v] for o in ("--layer", "--head") for v in ("-1", "x")],
    *[["--max-samples", v] for v in ("0", "-1", "x")],
    ["--unembedding", "{root}/plain.txt"],
    ["-o", "{out}/report.png"],
    ["-o", "{out}/missing/report.html"],
    *[["--trace", t] for t in NOT_TRACES],
]


@pytest.mark.parametrize("case", REPORT_CASES, ids=lambda v: str(v)[-40:])
def test_bad_report_input(files, tmp_path, capsys, case):
    trace, rest = str(files["trace"]), list(case)
    if rest[:1] == ["--trace"]:
        trace, rest = rest[1], rest[2:]
    if "-o" not in rest:
        rest += ["-o", "{out}/report.html"]
    fill = {"root": files["root"], "out": tmp_path}
    argv = ["report", trace.format(**fill), *(a.format(**fill) for a in rest)]
    assert_one_line(*call(argv, capsys), argv)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", [
    ["{trace}", "{trace}", "--rtol", "-1"],
    ["{trace}", "{trace}", "--rtol", "nan"],
    ["{trace}", "{trace}", "--atol", "inf"],
    ["{trace}", "{trace}", "--atol", "x"],
    ["{trace}", "{trace}", "--map", "{root}/missing.json"],
    ["{trace}", "{trace}", "--plot", "{root}/plot.gif"],
    ["{trace}"],
    *[["{trace}", t] for t in NOT_TRACES],
    *[[t, "{trace}"] for t in NOT_TRACES],
], ids=lambda v: " ".join(v)[-40:])
def test_bad_diff_input(files, capsys, case):
    argv = ["diff", *(a.format(trace=files["trace"], root=files["root"]) for a in case)]
    assert_one_line(*call(argv, capsys), argv)


@pytest.mark.parametrize("case", [*NOT_TRACES, ""])
def test_bad_info_input(files, capsys, case):
    argv = ["info", case.format(root=files["root"])]
    assert_one_line(*call(argv, capsys), argv)


def test_good_input_still_works(files, tmp_path, capsys):
    """The checks refuse only bad values: the boundaries of each range are accepted."""
    out = tmp_path / "s.png"
    assert main(["render", "stats", str(files["trace"]), "--bins", "10000", "--dpi", "10",
                 "-o", str(out)]) == 0
    assert main(["diff", str(files["trace"]), str(files["trace"]), "--rtol", "0",
                 "--atol", "0"]) == 0
    capsys.readouterr()
    assert out.is_file()


def test_console_script_prints_one_line(files, tmp_path):
    """The real process: a factory that raises and a range error, each one stderr line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for args in ([f"{files['root']}/models.py:boom"], [_MODEL.format(root=files["root"]),
                                                       "--max-length", "-1"]):
        out = tmp_path / "x.zarr"
        done = subprocess.run([sys.executable, "-m", "layerscope", "trace", *args, "-o", str(out)],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr and not out.exists()


def test_renderers_refuse_bad_numbers_from_python(files, tmp_path):
    from layerscope import renderers as r

    ds = layerscope.open_trace(files["trace"])
    for make in (lambda: r.ViewOptions(max_cells=0), lambda: r.ViewOptions(window=(4, 2)),
                 lambda: r.ViewOptions(window=(-1, 2)), lambda: r.ReportOptions(sample=-1),
                 lambda: r.ReportOptions(max_samples=0), lambda: r.ReportOptions(layer=1.5),
                 lambda: r.distributions(ds, bins=100_000_000), lambda: r.distributions(ds, bins=0),
                 lambda: r.histogram(ds["0@output"], bins=-1), lambda: r.top_tokens(ds, k=0),
                 lambda: r.attention_grid(ds, max_heads=0)):
        with pytest.raises(r.RenderError, match="must be|empty"):
            make()
    fig = r.distributions(ds, bins=5)
    for dpi in (0, 9, 100_000, 72.5):
        with pytest.raises(r.RenderError, match="dpi must be a whole number in 10..1200"):
            r.save(fig, tmp_path / "x.png", dpi=dpi)
    assert list(tmp_path.iterdir()) == []

"""Skipped sites are recorded in the store, never warned about; real warnings name the
user's line."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

import layerscope
from layerscope.core import Selection, StoreOptions, read_attrs
from layerscope.core.format import new_group_attrs
from layerscope.core.info import format_summary, summarize
from layerscope.core.recorder import Recorder
from layerscope.core.store import open_group_for_writing
from layerscope.core.userwarn import is_internal, warn_user
from layerscope.core.writer import TraceWriter

TABLE = "shape (1, 3) has no leading batch axis of 2"


def make_recorder(path, mode="w-"):
    attrs = new_group_attrs("numpy", "0", {"class": "test"}, Selection().to_json())
    group, existing = open_group_for_writing(path, mode, attrs)
    writer = TraceWriter(group, StoreOptions(mode=mode), int(existing.get("committed_samples", 0)),
                         int(existing.get("committed_batches", 0)))
    return Recorder(writer, Selection(), "numpy")


def one_pass(recorder, size, broadcast=("table",)):
    recorder.begin_pass(size)
    for site in broadcast:
        recorder.put(site, "output", np.ones((1, 3), np.float32), ("batch", "hidden"))
    recorder.put("x", "output", np.full((size, 3), size, np.float32), ("batch", "hidden"))
    recorder.end_pass()


def test_a_skipped_site_is_recorded_at_the_first_commit_not_warned(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_pass(recorder, 2)
        # the writer is still running: the record is already in the published root attributes
        assert read_attrs(path)["skipped"] == {"table@output": TABLE}
        one_pass(recorder, 2)  # later commits keep it
        assert read_attrs(path)["skipped"] == {"table@output": TABLE}
        recorder.close()
    attrs = read_attrs(path)
    assert attrs["status"] == "complete" and attrs["committed_batches"] == 2
    assert attrs["skipped"] == {"table@output": TABLE}


def test_a_store_without_skipped_sites_records_an_empty_dict(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    one_pass(recorder, 2, broadcast=())
    recorder.close()
    assert read_attrs(path)["skipped"] == {}
    assert "not captured" not in format_summary(summarize(path))


def test_an_append_merges_its_skipped_sites_with_the_stores(tmp_path):
    path = tmp_path / "t.zarr"
    first = make_recorder(path)
    one_pass(first, 2)
    first.close()
    second = make_recorder(path, mode="a")
    # batch of 1: a (1, 3) table looks per-sample, but the store skips it in every batch
    one_pass(second, 1, broadcast=("table",))
    one_pass(second, 2, broadcast=("table", "rope"))
    second.close()
    attrs = read_attrs(path)
    assert attrs["skipped"] == {
        "table@output": TABLE, "rope@output": "shape (1, 3) has no leading batch axis of 2",
    }
    ds = layerscope.open_trace(path)
    assert "table@output" not in ds and "rope@output" not in ds
    np.testing.assert_array_equal(ds["x@output"].values[:, 0], [2, 2, 1, 2, 2])


def test_a_failed_capture_keeps_the_record(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    recorder.begin_pass(2)
    recorder.put("table", "output", np.ones((1, 3), np.float32), ("batch", "hidden"))
    recorder.close(failed=True)
    attrs = read_attrs(path)
    assert attrs["status"] == "aborted" and attrs["skipped"] == {"table@output": TABLE}


def test_info_lists_the_skipped_sites_with_their_reasons(tmp_path):
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    one_pass(recorder, 2, broadcast=("table", "embeddings.position"))
    recorder.close()
    summary = summarize(path)
    assert summary.skipped == {"table@output": TABLE, "embeddings.position@output": TABLE}
    lines = format_summary(summary).splitlines()
    at = lines.index("not captured (2)")
    assert lines[at + 1].split() == ["table@output", *TABLE.split()]
    assert lines[at + 2].split() == ["embeddings.position@output", *TABLE.split()]


@pytest.fixture
def aborted(tmp_path):
    path = tmp_path / "aborted.zarr"
    recorder = make_recorder(path)
    one_pass(recorder, 2, broadcast=())
    recorder.close(failed=True)
    return path


def test_a_real_warning_names_the_users_line(aborted):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _next_line()
        layerscope.open_trace(aborted)
    assert [str(w.message) for w in caught] == [
        f"{aborted} has status 'aborted': the capture was interrupted; showing the 1 committed "
        "batches"
    ]
    assert caught[0].filename == __file__ and caught[0].lineno == line
    assert caught[0].category is UserWarning


def test_a_warning_from_python_dash_c_is_shown(aborted):
    """``python -c`` and the REPL run in a __main__ whose loader has no source to show: the
    warning is still issued (it once raised ImportError from the warnings machinery)."""
    import subprocess

    code = f"import layerscope; layerscope.open_trace({str(aborted)!r}); print('opened')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "opened"
    assert "has status 'aborted'" in done.stderr and "<string>:1: UserWarning" in done.stderr


def test_a_warning_shows_once_per_user_line():
    hook = _module("layerscope.backends.fake", "from layerscope.core.userwarn import warn_user\n"
                                               "def hook():\n    warn_user('once')\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: once per module and line
        first = _next_line()
        for _ in range(3):
            hook["hook"]()
        hook["hook"]()
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, first + 1), (__file__, first + 2)]


def _module(name: str, source: str) -> dict:
    """Run ``source`` as if it were the module ``name`` (a framework without importing it)."""
    namespace: dict = {"__name__": name}
    exec(compile(source, f"/site-packages/{name.replace('.', '/')}.py", "exec"), namespace)
    return namespace


def test_frames_of_layerscope_and_frameworks_are_walked_past():
    hook = _module("layerscope.backends.fake", "from layerscope.core.userwarn import warn_user\n"
                                               "def hook():\n    warn_user('from a hook')\n")
    torch_like = _module("torch.nn.modules.fake", "def call(f):\n    return f()\n")
    transformers_like = _module("transformers.models.fake",
                                "def forward(call, f):\n    return call(f)\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = _next_line()
        transformers_like["forward"](torch_like["call"], hook["hook"])
    assert [(w.filename, w.lineno, str(w.message)) for w in caught] == [
        (__file__, line, "from a hook")
    ]


def test_a_user_module_is_not_internal():
    assert is_internal("layerscope.core.reader") and is_internal("torch.nn.modules.module")
    assert is_internal("keras_hub.src.models") and is_internal("contextlib")
    assert is_internal("__autograph_generated_filea1b2c3")
    assert not is_internal("tests.core.test_skipped_and_warnings")
    assert not is_internal("__main__") and not is_internal("torchvision_user_script")


def test_warn_user_called_from_user_code_names_that_line():
    with pytest.warns(RuntimeWarning, match="direct") as caught:
        line = _next_line()
        warn_user("direct", RuntimeWarning)
    assert caught[0].filename == __file__ and caught[0].lineno == line


def _next_line() -> int:
    """The number of the line after the caller's (the line a test expects a warning on)."""
    return sys._getframe(1).f_lineno + 1


def test_a_scalar_output_is_skipped_with_its_reason_in_every_backend(tmp_path):
    """A module that returns a scalar (a loss) has nothing to store per sample: each backend
    records why, beside what it stored, instead of passing over it without a word."""
    import jax.numpy as jnp
    import keras
    import torch
    from flax import nnx

    from layerscope.core.recorder import SCALAR

    class TorchLoss(torch.nn.Module):
        def forward(self, x):
            return x.pow(2).mean()

    class TorchModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.loss = torch.nn.Linear(4, 4), TorchLoss()

        def forward(self, x):
            y = self.lin(x)
            return y, self.loss(y)

    class JaxLoss(nnx.Module):
        def __call__(self, x):
            return (x ** 2).mean()

    class JaxModel(nnx.Module):
        def __init__(self, rngs):
            self.lin, self.loss = nnx.Linear(4, 4, rngs=rngs), JaxLoss()

        def __call__(self, x):
            y = self.lin(x)
            return y, self.loss(y)

    class KerasLoss(keras.layers.Layer):
        def call(self, x):
            return keras.ops.mean(x ** 2)

    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4, name="lin")(inputs)
    keras_model = keras.Model(inputs, [hidden, KerasLoss(name="loss")(hidden)])
    torch_model, jax_model = TorchModel(), JaxModel(nnx.Rngs(0))
    runs = {"torch": (torch_model, lambda: torch_model(torch.randn(2, 4))),
            "jax": (jax_model, lambda: jax_model(jnp.ones((2, 4)))),
            "keras": (keras_model, lambda: keras_model(np.ones((2, 4), np.float32)))}
    for name, (model, call) in runs.items():
        path = tmp_path / f"{name}.zarr"
        with layerscope.trace(model, path, ["lin", "loss"]):
            call()
        ds = layerscope.open_trace(path)
        assert "lin@output" in ds, name
        assert ds.attrs["skipped"] == {"loss@output": SCALAR}, name

"""A disk that fills up while a model is traced: the write that fails surfaces in the caller
as a WriterError naming the step and the path within seconds, the process exits cleanly, and
the store opens afterwards with every committed batch intact (issue 14, "ENOSPC by ulimit -f").

Two ways to run out of room: a file size limit (RLIMIT_FSIZE, as ``ulimit -f`` sets it, with
SIGXFSZ ignored so that writes fail with EFBIG), and a small tmpfs (ENOSPC).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import layerscope

WIDTH = 4096  # the hidden layer: 8 samples of it are 128 KiB raw
SIZE = 8
CONSTANT = 3  # batches 0..2 repeat one row 8 times (they compress well), later ones are random
FILE_LIMIT = 96 << 10  # more than a constant batch's chunk, less than a random one's
HANG = 5.0  # seconds from the failing batch to the WriterError in the caller

CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    import layerscope
    from layerscope import StoreOptions, WriterError

    sys.path.insert(0, sys.argv[2])
    from test_write_disk_full import batch, model

    path, batches = sys.argv[1], int(sys.argv[3])
    net, report, started = model(), {"error": None}, None
    try:
        with torch.no_grad(), layerscope.trace(net, path, capture=["0", "1", "2"]):
            for number in range(batches):
                started = time.monotonic()
                net(batch(number))
    except WriterError as exc:
        report.update(error=str(exc), seconds=time.monotonic() - started, batch=number)
    print(json.dumps(report), flush=True)
""")


def model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, WIDTH), torch.nn.ReLU(),
                               torch.nn.Linear(WIDTH, 16))


def batch(number):
    import torch

    if number < CONSTANT:
        return torch.full((SIZE, 16), float(number + 1)) * torch.linspace(-1, 1, 16)
    return torch.randn((SIZE, 16), generator=torch.Generator().manual_seed(number))


def run_child(tmp_path, path, batches, limit=None):
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-P", str(script), str(path), here, str(batches)],
                          capture_output=True, text=True, timeout=120, env=env,
                          preexec_fn=limited if limit is not None else None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_committed(path):
    """The store opens; every committed row of every variable equals what the model gave."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = layerscope.open_trace(path)
    attrs = ds.attrs
    assert attrs["status"] in ("aborted", "writing"), attrs["status"]
    batches, rows = attrs["committed_batches"], attrs["committed_samples"]
    assert rows == batches * SIZE
    net = model()
    with torch.no_grad():
        outputs = [net[:1](batch(n)) for n in range(batches)], \
            [net[:2](batch(n)) for n in range(batches)], [net(batch(n)) for n in range(batches)]
    for site, want in zip(("0", "1", "2"), outputs, strict=True):
        name = next(v for v in ds.data_vars if str(v).startswith(f"{site}@output"))
        got = ds[name].values
        assert got.shape[0] == rows
        if batches:
            assert got.tobytes() == np.concatenate([w.numpy() for w in want]).tobytes(), name
    assert layerscope.verify(path).ok
    return batches


def test_a_file_size_limit_is_a_writer_error_and_committed_batches_survive(tmp_path):
    path = tmp_path / "t.zarr"
    report = run_child(tmp_path, path, 12, limit=FILE_LIMIT)
    error = report["error"]
    assert error is not None, "no write failed: the limit is too large for this test"
    assert report["batch"] >= CONSTANT and report["seconds"] < HANG, report
    assert "chunk write" in error and str(path) in error and "File too large" in error, error
    assert "\n" not in error
    assert check_committed(path) >= CONSTANT - 1


@pytest.fixture()
def small_tmpfs(tmp_path):
    from ..tmpfs import mounted_tmpfs  # here: a child process imports this file as a script

    with mounted_tmpfs(tmp_path / "tmpfs", "4m") as folder:
        yield folder


def test_a_full_tmpfs_is_a_writer_error_and_committed_batches_survive(tmp_path, small_tmpfs):
    path = small_tmpfs / "t.zarr"
    report = run_child(tmp_path, path, 200)
    error = report["error"]
    assert error is not None, "the tmpfs never filled up"
    assert report["seconds"] < HANG, report
    assert str(path) in error and "No space left on device" in error and "\n" not in error
    assert check_committed(path) >= CONSTANT

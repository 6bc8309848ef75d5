"""A randomized mini-campaign: a few hundred random damages (a byte changed, a file cut short or
deleted) to random files of a small trace, with a fixed seed. Every read either returns the
original values or raises a LayerscopeError, nothing else is ever raised, and verify names every
damaged chunk. benchmarks/faults.py runs the long version."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

import layerscope
from layerscope import LayerscopeError

from .damage import make_trace

ROUNDS = 300
SEED = 14


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("campaign") / "t.zarr"
    make_trace(path, batches=3)
    ds = layerscope.open_trace(path)
    values = {str(name): ds[name].values for name in ds.variables if name != "token"}
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    return path, values, files


def _damage(rng: random.Random, target) -> str:
    data = target.read_bytes()
    roll = rng.random()
    if roll < 0.1:
        target.unlink()
        return "deleted"
    if roll < 0.25 and len(data) > 1:
        target.write_bytes(data[: rng.randrange(len(data))])
        return "truncated"
    blob = bytearray(data)
    blob[rng.randrange(len(blob))] ^= rng.randrange(1, 256)
    target.write_bytes(bytes(blob))
    return "changed"


def _read_all(path, expected) -> str:
    """'same' when every variable reads back as it was written, 'refused' when a
    LayerscopeError was raised; anything else fails the test."""
    try:
        ds = layerscope.open_trace(path)
        names = {str(name) for name in ds.variables if name != "token"}
        assert names == set(expected), f"variables changed silently: {names ^ set(expected)}"
        for name, values in expected.items():
            read = ds[name].values
            assert read.shape == values.shape and np.array_equal(read, values, equal_nan=True), \
                f"{name} read silently wrong values"
    except LayerscopeError:
        return "refused"
    return "same"


def test_random_damage_is_never_silent_or_untyped(pristine, tmp_path):
    path, expected, files = pristine
    rng = random.Random(SEED)
    chunks = [f for f in files if "/c." in f]
    others = [f for f in files if f not in chunks]
    outcomes = {"same": 0, "refused": 0}
    for round_ in range(ROUNDS):
        work = tmp_path / f"r{round_}.zarr"
        shutil.copytree(path, work)
        name = rng.choice(chunks if rng.random() < 0.6 else others)
        _damage(rng, work / name)
        outcomes[_read_all(work, expected)] += 1
        try:
            report = layerscope.verify(work)
        except LayerscopeError:
            report = None  # the root metadata itself is unusable: a one-line error
        if name in chunks:
            assert report is not None and name in {f.key for f in report.faults}, \
                f"round {round_}: verify missed damaged chunk {name}"
        shutil.rmtree(work)
    assert outcomes["refused"] > ROUNDS // 2  # most damage is refused, none passes silently

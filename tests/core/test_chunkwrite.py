"""The writer's own chunk encoding gives exactly the files zarr writes itself."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

import layerscope
from layerscope.core.chunkfile import ChunkFiles
from layerscope.core.chunkwrite import ChunkWriter
from layerscope.core.writer import CHUNK_KEYS

from .test_writer import make_recorder

SETTINGS = {
    "raw + crc32c": dict(compressors=[Crc32cCodec()]),
    "raw": dict(compressors=None),
    "big-endian + crc32c": dict(compressors=[Crc32cCodec()], serializer=BytesCodec(endian="big")),
    "blosc + crc32c": dict(compressors=[BloscCodec(cname="lz4", clevel=1), Crc32cCodec()]),
}


def _array(root, name, **codecs):
    group = zarr.open_group(root, mode="a")
    return group.create_array(name, shape=(8, 3, 5), chunks=(4, 3, 5), dtype="float32",
                              chunk_key_encoding=CHUNK_KEYS, **codecs)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("direct", [True, False, None])
def test_chunk_files_match_zarrs_own(tmp_path, setting, direct):
    """``direct=None``: through the store instead of ChunkFiles."""
    data = np.random.default_rng(1).standard_normal((8, 3, 5)).astype(np.float32)
    data[:, 0] = 0  # something for the compressor to find
    theirs = _array(tmp_path / "zarr", "v", **SETTINGS[setting])
    theirs[:] = data
    ours = _array(tmp_path / "ours", "v", **SETTINGS[setting])
    files = None if direct is None else ChunkFiles(tmp_path / "ours", direct)
    writer = ChunkWriter(ours, files)
    assert writer.raw is setting.startswith("raw")  # the bytes codec skipped on this machine
    assert writer.covers(0, data)
    writer.write(0, data[:4])
    writer.write(4, data[4:])
    for key in ("c.0.0.0", "c.1.0.0"):
        assert (tmp_path / "ours/v" / key).read_bytes() == (tmp_path / "zarr/v" / key).read_bytes()
    np.testing.assert_array_equal(ours[:], data)


def test_non_native_input_is_converted_like_zarr_does(tmp_path):
    """Data in the other byte order than the codec's still stores the same numbers."""
    data = np.arange(120, dtype=">f4").reshape(8, 3, 5)
    ours = _array(tmp_path / "ours", "v", compressors=[Crc32cCodec()])
    ChunkWriter(ours, ChunkFiles(tmp_path / "ours")).write(0, data)
    theirs = _array(tmp_path / "zarr", "v", compressors=[Crc32cCodec()])
    theirs[:] = data
    assert (tmp_path / "ours/v/c.0.0.0").read_bytes() == (tmp_path / "zarr/v/c.0.0.0").read_bytes()
    np.testing.assert_array_equal(ours[:], data)


@pytest.mark.parametrize("sizes", [(4, 4, 3, 4, 4), (3, 8, 3)])
def test_whole_and_partial_chunks_mix(tmp_path, sizes):
    """Batches that fill whole chunks (written here) and batches that do not (written by zarr,
    which needs the array's rows in memory) read back as one array."""
    path = tmp_path / "t.zarr"
    recorder = make_recorder(path)
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((size, 6, 5), np.float32) for size in sizes]
    for data in batches:
        recorder.begin_pass(len(data))
        recorder.put("block", "output", data, ("batch", "token", "hidden"))
        recorder.end_pass()
    recorder.close()
    stored = layerscope.open_trace(path)["block@output"].values
    np.testing.assert_array_equal(stored, np.concatenate(batches))
    np.testing.assert_array_equal(zarr.open_array(path / "block@output", mode="r")[:], stored)

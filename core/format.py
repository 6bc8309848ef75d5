"""The on-disk format: schema version, group attributes and storage codecs."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

from .chunking import ChunkPolicy
from .gather import GatherPolicy

# the root document's names live in .schema (which imports nothing); they are read from here too
from .schema import (  # noqa: F401
    BATCH,
    DECODER_TOKEN_ID,
    DECODER_TOKEN_MASK,
    DECODER_TOKEN_STEP,
    DECODER_TOKEN_TEXT,
    INPUT_TEXT,
    SCHEMA_VERSION,
    SKIPPED,
    STATUS_ABORTED,
    STATUS_COMPLETE,
    STATUS_REPLACING,
    STATUS_WRITING,
    TOKEN_ID,
    TOKEN_MASK,
    TOKEN_STEP,
    TOKEN_TEXT,
    skipped_sites,
)


@dataclass(frozen=True)
class Compression:
    """Blosc settings, plus the crc32c checksum every chunk carries.

    Chosen with benchmarks/codecs.py on MiniLM tensors (figures in benchmarks/README.md,
    Compression settings). Dense float32 activations (hidden states, MLP outputs, attention
    maps of unpadded text) shrink little under any fast Blosc setting, and the CPU time spent
    compressing them is time that a model keeping every core busy loses. Tensors with runs of
    zeros (attention over padding, causal masks) shrink a lot, and LZ4 at level 1 without
    shuffle does that fastest. So a variable is compressed only when its first batch (up to
    4 MB of it) shrinks by at least ``min_saving``; the others are stored as they are, checksum
    included. ``min_saving=0`` compresses everything, e.g.
    ``Compression("zstd", 1, "shuffle", min_saving=0)`` for the smallest stores.
    """

    cname: str = "lz4"
    clevel: int = 1
    shuffle: str = "noshuffle"
    enabled: bool = True
    checksum: bool = True
    blocksize: int = 1 << 20  # bytes Blosc compresses at a time; 0: Blosc chooses
    min_saving: float = 0.2

    def codecs_for(self, sample: Any) -> list[Any]:
        """The codecs for a variable whose first batch is ``sample`` (a numpy array)."""
        compress = self.enabled and self.worth_compressing(sample)
        made = _CODECS.get((self, compress))
        if made is None:  # zarr's codec objects are immutable: a store of a thousand
            made = _CODECS[self, compress] = self._codecs(compress)  # arrays shares them
        return list(made)

    def _codecs(self, compress: bool) -> tuple[Any, ...]:
        from zarr.codecs import BloscCodec, Crc32cCodec

        codecs: list[Any] = []
        if compress:
            blosc: Any = BloscCodec  # cname/shuffle are checked by the codec itself
            codecs.append(blosc(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle,
                                blocksize=self.blocksize))
        if self.checksum:
            codecs.append(Crc32cCodec())
        return tuple(codecs)

    def worth_compressing(self, sample: Any) -> bool:
        if self.min_saving <= 0 or sample.dtype.kind not in "biuf" or not sample.size:
            return True
        import numpy as np
        from numcodecs import blosc

        probe = np.ascontiguousarray(sample.reshape(-1)[: PROBE_BYTES // sample.dtype.itemsize])
        # Blosc's own function, as the codec calls it (a codec made for every variable of a
        # store of a thousand took as long as compressing the probe)
        packed = blosc.compress(probe, self.cname.encode(), self.clevel, _SHUFFLES[self.shuffle],
                                self.blocksize, probe.dtype.itemsize)
        return len(packed) <= (1 - self.min_saving) * probe.nbytes


PROBE_BYTES = 4 << 20  # how much of a variable's first batch decides its compression
_CODECS: dict[tuple[Compression, bool], tuple[Any, ...]] = {}
_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


@dataclass(frozen=True)
class StoreOptions:
    """How a trace is stored. ``mode``: 'w-' new only, 'w' overwrite, 'a' append."""

    mode: str = "w-"
    compression: Compression = Compression()
    chunks: ChunkPolicy = ChunkPolicy()
    workers: int = 2
    #: bytes that may wait to be written; None: 64 MB during the first batch, then what that
    #: batch held, clamped to [64 MB, 1 GB]: the model runs at most one batch ahead of the
    #: disk, and the host buffers that one batch needs are reused for every later one (peak
    #: memory bounded by batch 1). A tensor larger than the budget still passes once nothing
    #: else waits: a first batch of huge tensors holds one of them at a time
    max_pending_bytes: int | None = None
    downcast: str | None = None  # e.g. "float16": store floats smaller, on request only
    #: on a local disk, write chunk bodies with O_DIRECT (no page-cache copy; see chunkfile)
    direct_io: bool = True
    #: record each chunk file's size and crc32c at commit (core/manifest.py), so that a
    #: missing, swapped or damaged chunk is found by ``layerscope verify``
    checksums: bool = True
    #: commits survive a power loss: chunk files, manifests and folders are flushed to the
    #: disk (fsync) before the root document that commits them, and that document after
    durable: bool = False
    #: small variables of a model traced at many sites: chunks of several batches, committed
    #: in groups (core/gather.py; docs/guarantees.md says what a crash can lose then)
    gathering: GatherPolicy = GatherPolicy()
    #: on Linux, a group of many gathered chunks is written by a process of its own, so that
    #: writing thousands of small files takes no turns of Python's lock from the model's
    #: thread (core/chunkproc.py); False: the writer threads write them
    chunk_process: bool = True


def new_group_attrs(
    framework: str, framework_version: str, model: dict[str, Any], capture: dict[str, Any]
) -> dict[str, Any]:
    from layerscope import __version__

    return {
        "layerscope_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "framework": framework,
        "framework_version": framework_version,
        "model": model,
        "capture": capture,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "status": STATUS_WRITING,
        "committed_batches": 0,
        "committed_samples": 0,
        SKIPPED: {},
    }


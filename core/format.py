"""The on-disk format: schema version, group attributes and storage codecs."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any

from .chunking import ChunkPolicy

SCHEMA_VERSION = 1
STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"
STATUS_ABORTED = "aborted"

#: Coordinates every trace may carry besides the captured variables.
BATCH = "batch"
TOKEN_TEXT = "token_text"
TOKEN_ID = "token_id"
INPUT_TEXT = "input_text"


@dataclass(frozen=True)
class Compression:
    """Blosc settings. Defaults chosen by benchmarks/codecs.py on MiniLM activations: LZ4 at
    level 5 with bit-shuffle stores 73% of the raw bytes at nearly LZ4-1's speed; Zstd shrinks
    no better on float32 activations and writes at well under half the speed."""

    cname: str = "lz4"
    clevel: int = 5
    shuffle: str = "bitshuffle"
    enabled: bool = True
    checksum: bool = True

    def codecs(self) -> list[Any]:
        from zarr.codecs import BloscCodec, Crc32cCodec

        codecs: list[Any] = []
        if self.enabled:
            blosc: Any = BloscCodec  # cname/shuffle are checked by the codec itself
            codecs.append(blosc(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle))
        if self.checksum:
            codecs.append(Crc32cCodec())
        return codecs


@dataclass(frozen=True)
class StoreOptions:
    """How a trace is stored. ``mode``: 'w-' new only, 'w' overwrite, 'a' append."""

    mode: str = "w-"
    compression: Compression = Compression()
    chunks: ChunkPolicy = ChunkPolicy()
    workers: int = 2
    #: bytes that may wait to be written; None: twice what the first batch held, clamped to
    #: [64 MB, 1 GB], so the model runs at most about two batches ahead of the disk
    max_pending_bytes: int | None = None
    downcast: str | None = None  # e.g. "float16": store floats smaller, on request only
    #: how much lower the writer threads' CPU priority is than the model's (Linux nice steps);
    #: 0 by default: on a machine the model saturates, starving the writer only serialises it
    writer_nice: int = 0


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
    }

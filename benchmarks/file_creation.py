"""What creating a chunk file costs the kernel, in a quiet folder and right after a delete.

A trace creates a dozen files per batch. On a file system that passes over recently freed
inodes when it allocates new ones (ext4 without a journal does), files created in the minutes
after thousands were deleted cost far more. The "quiet" folder is only as quiet as the machine:
deletes made by anything in the minutes before the script count too. The two cases are measured
one after the other, the same way: ``--files`` files of 64 KiB written by the writer's own
``ChunkFiles`` (``O_DIRECT`` where the file system allows it), timing the process's kernel CPU
(and wall time) per file.

    python benchmarks/file_creation.py [--files 1000] [--deleted 20000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from layerscope.core.chunkfile import ChunkFiles
from layerscope.core.hostpool import page_aligned

BODY = 64 << 10


def create(folder: Path, count: int) -> tuple[float, float]:
    """Kernel CPU seconds and wall seconds per file for ``count`` new files in ``folder``,
    written the way a trace writes its chunk files."""
    folder.mkdir()
    body = page_aligned(BODY)  # as the writer's pool gives it; O_DIRECT needs the alignment
    body[:] = np.frombuffer(os.urandom(BODY), dtype=np.uint8)
    files = ChunkFiles(folder)
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
    for index in range(count):
        files.write(str(index), body, b"")
    wall = time.perf_counter() - start
    return (resource.getrusage(resource.RUSAGE_SELF).ru_stime - before) / count, wall / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000, help="files created per case")
    parser.add_argument("--deleted", type=int, default=20000, help="files deleted before case 2")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="layerscope-files-", dir=args.dir))
    try:
        quiet = create(work / "quiet", args.files)
        create(work / "doomed", args.deleted)
        shutil.rmtree(work / "doomed")
        after = create(work / "after-delete", args.files)
    finally:
        shutil.rmtree(work)
    print(f"{args.files} files of {BODY >> 10} KiB under {args.dir}")
    print(f"{'case':<34} {'kernel CPU/file':>16} {'wall/file':>10}")
    for name, (cpu, wall) in (("quiet folder", quiet),
                              (f"right after deleting {args.deleted}", after)):
        print(f"{name:<34} {cpu * 1e6:>13.0f} us {wall * 1e6:>7.0f} us")
    print(f"after a delete / quiet: {after[0] / quiet[0]:.1f}x kernel CPU")


if __name__ == "__main__":
    main()

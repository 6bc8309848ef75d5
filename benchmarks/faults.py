"""Fault campaign, the long version of tests/faults: writers killed, stores damaged.

Kills. A writer traces batches of a deterministic NumPy workload (five variables, one of them
compressed, two skipped in some batches, batch sizes 1-6 so chunks end mid-batch) and is
SIGKILLed at a random moment, or at the n-th call of a chosen step (a chunk file, zarr's own
write of a partial chunk, a manifest, a commit, a rename, a deletion while mode="w" clears the
old store, the first root document). Stores live in chains: created (mode "w-"), appended to
(mode "a", also after a kill), overwritten (mode "w"), in tmpfs and on disk, with and without
``durable``. After each kill the store either opens and every committed batch reads back bit
for bit (the data of batch n is a function of the writing session and n), or it is refused
with a LayerscopeError (a tombstone, a store never created); committed batches never decrease
but by a mode="w" replace; a store that is refused is then replaced by mode="w"; an append
after a kill shows fill values, never the killed batch, where it skips a variable.

Corruptions. Copies of small complete stores (whole chunks, partial chunks, everything
compressed) get one random damage each: bytes flipped, cut or added in any file (chunk,
chunk manifest, array or root zarr.json), a file or folder deleted, two chunks or two JSON
files swapped, a chunk from another store, garbage or null JSON. Then every variable is read
through open_trace and layerscope.verify runs.

Every writer, check and reader runs in a process forked from this one, which imported
everything and never starts a thread; a watchdog turns 30 s without progress into a hang.

    .venv/bin/python benchmarks/faults.py                       # 1,000 kills, 10,000 damages
    .venv/bin/python benchmarks/faults.py --quick               # 20 kills, 200 damages
    .venv/bin/python benchmarks/faults.py --seed 14 --only kill:37   # replays trial 37's chain
    .venv/bin/python benchmarks/faults.py --seed 14 --only damage:512
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from _faults_damage import DamageCampaign
from _faults_kills import KillCampaign
from _faults_workload import Workload

# -- the report ----------------------------------------------------------------------------------

MUST_BE_ZERO = ("committed data lost", "silently wrong reads", "hangs", "untyped errors",
                "writes that failed")


def table(kills: KillCampaign | None, damages: DamageCampaign | None) -> str:
    k = kills.counts if kills else Counter()
    d = damages.counts if damages else Counter()
    rows = [("trials", k["trials"], d["trials"])]
    rows += [(f"**{name}** (must be 0)", k[name], d[name] if name != "committed data lost"
              and name != "writes that failed" else "") for name in MUST_BE_ZERO]
    rows += [("writers SIGKILLed (at a random moment / at a chosen point)",
              f"{k['SIGKILLs']} ({kills.points['at a random moment'] if kills else 0} / "
              f"{kills.points['at a chosen point'] if kills else 0})", ""),
             ("writers that finished before the kill", k["finished before the kill"], ""),
             ("stores refused cleanly (tombstone, never created)", k["stores refused cleanly"],
              ""),
             ("stores that needed mode='w'", k["needed mode='w'"], ""),
             ("stores checked (after each writer)", k["checks"], ""),
             ("killed stores verify flagged", k["verify flagged a killed store"], "")]
    rows += [(name, "", d[name]) for name in ("detected by reads", "detected by verify",
                                              "nothing observable",
                                              "reads refused, verify said ok",
                                              "a damaged chunk verify did not name")]
    lines = ["| count | kills | corruptions |", "|---|---:|---:|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    if damages:
        lines += ["", "| damage | trials | detected by reads | detected by verify | "
                  "nothing observable |", "|---|---:|---:|---:|---:|"]
        for kind, c in damages.kinds.items():
            lines.append(f"| {kind} | {c['trials']} | {c['detected by reads']} | "
                         f"{c['detected by verify']} | {c['nothing observable']} |")
    return "\n".join(lines)


def preload() -> None:
    """Import what reading a trace imports lazily (xarray, dask, their plugin lists), here
    in the parent, so that a forked child does not import it again each time."""
    import dask.array  # noqa: F401
    import xarray
    from xarray.backends.plugins import list_engines
    from xarray.namedarray.parallelcompat import list_chunkmanagers

    list_engines()
    list_chunkmanagers()
    xarray.Dataset()
    if threading.active_count() != 1:
        raise RuntimeError("importing started a thread: the campaign cannot fork safely")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=1000, help="writers SIGKILLed")
    parser.add_argument("--corruptions", type=int, default=10000, help="damaged store copies")
    parser.add_argument("--quick", action="store_true", help="20 kills, 200 corruptions")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--only", help="kill:N or damage:N: replay one trial (a kill trial "
                        "replays its chain from the start)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds without progress that count as a hang")
    parser.add_argument("--keep", help="copy stores read silently wrong or with untyped "
                        "errors into this folder")
    parser.add_argument("--log", help="write every failing and informative case to this file")
    args = parser.parse_args()
    if args.quick:
        args.kills, args.corruptions = 20, 200
    only_kind, _, only = (args.only or ":").partition(":")
    only_trial = int(only) if only else None
    started = time.monotonic()
    preload()
    tmpfs = Path(tempfile.mkdtemp(prefix="layerscope-faults-", dir="/dev/shm"
                                  if os.path.isdir("/dev/shm") else None))
    disk = Path(tempfile.mkdtemp(prefix="layerscope-faults-"))
    work = Workload(args.seed)
    kills = damages = None
    try:
        if only_kind in ("", "kill") and args.kills > 0:
            kills = KillCampaign(args, work, {"tmpfs": tmpfs, "disk": disk})
            kills.run(only_trial if only_kind == "kill" else None)
            print(f"kills done in {time.monotonic() - started:.0f} s", file=sys.stderr)
        if only_kind in ("", "damage") and args.corruptions > 0:
            damages = DamageCampaign(args, work, tmpfs / "damage")
            damages.run(only_trial if only_kind == "damage" else None)
    finally:
        shutil.rmtree(tmpfs, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)
    elapsed = time.monotonic() - started
    print(table(kills, damages))
    print(f"\nseed {args.seed}, wall time {elapsed / 60:.1f} min")
    failures = [*(kills.failures if kills else []), *(damages.failures if damages else [])]
    bad = sum(c.counts[name] for c in (kills, damages) if c for name in MUST_BE_ZERO)
    notes = [f for f in failures if f.startswith("(informative)")]
    errors = [f for f in failures if not f.startswith("(informative)")]
    if args.log:
        Path(args.log).write_text("".join(f"{line}\n" for line in errors + notes))
    for line in errors[:30] + notes[:10]:
        print(line, file=sys.stderr)
    if bad:
        print(f"{bad} must-be-zero counts; replay one with --seed {args.seed} --only kill:N "
              "or --only damage:N", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""The fault campaign's corruptions (benchmarks/faults.py): copies of complete stores
damaged once each, then read back and verified."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _common import Send, run_child
from _faults_workload import Workload, compare, write_session

import layerscope
from layerscope import LayerscopeError
from layerscope.core import Compression, StoreOptions
from layerscope.core.chunking import ChunkPolicy

# -- corruptions ---------------------------------------------------------------------------------

#: store -> (sizes of its batches, options); the donor of each has other values, one more batch
STORES = {
    "whole chunks": ([4, 4, 4], StoreOptions()),
    "partial chunks": ([4, 3, 5, 2], StoreOptions(chunks=ChunkPolicy(target_bytes=4096))),
    "all compressed": ([3, 3, 3, 3], StoreOptions(compression=Compression(min_saving=0))),
}
PRISTINE_SESSION = 10_000_000
DAMAGES = {"flip a byte": 0.25, "flip a run of bytes": 0.08, "truncate": 0.12,
           "append bytes": 0.05, "delete": 0.1, "swap two chunks": 0.1,
           "chunk of another store": 0.1, "garbage JSON": 0.1, "swap two JSON files": 0.05,
           "delete a folder": 0.05}
FILES = {"chunk": 0.5, "root zarr.json": 0.15, "array zarr.json": 0.15, "manifest": 0.15,
         "lock": 0.05}
GARBAGE = [b"null", b"", b"{", b"[]", b"{}", b"0", b'"zarr"', b"true", b'{"zarr_format": 3}']


def kind_of(rel: str) -> str:
    if rel == "zarr.json":
        return "root zarr.json"
    if rel.startswith("_layerscope/"):
        return "lock" if rel.endswith("/lock") else "manifest"
    return "array zarr.json" if rel.endswith("/zarr.json") else "chunk"


def listing(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def damage(rng: random.Random, path: Path, donor: Path) -> tuple[str, str, list[str]]:
    """Apply one random damage to the store at ``path``: (kind, what, paths touched)."""
    files = sorted(listing(path))
    by_kind: dict[str, list[str]] = {}
    for rel in files:
        by_kind.setdefault(kind_of(rel), []).append(rel)
    chunks = by_kind["chunk"]
    jsons = [f for f in files if f.endswith(".json")]
    kind = rng.choices(list(DAMAGES), list(DAMAGES.values()))[0]
    group = rng.choices(list(FILES), list(FILES.values()))[0]
    rel = rng.choice(by_kind.get(group) or chunks)
    target = path / rel
    data = target.read_bytes()
    if kind in ("flip a byte", "flip a run of bytes") and data:
        blob = bytearray(data)
        at = rng.randrange(len(blob))
        for i in range(at, min(len(blob), at + (rng.randint(2, 16) if "run" in kind else 1))):
            blob[i] ^= rng.randrange(1, 256)
        target.write_bytes(bytes(blob))
        return kind, f"{rel} at {at}", [rel]
    if kind == "truncate" and data:
        cut = rng.randrange(len(data))
        target.write_bytes(data[:cut])
        return kind, f"{rel} to {cut} of {len(data)} bytes", [rel]
    if kind == "append bytes":
        target.write_bytes(data + rng.randbytes(rng.randint(1, 64)))
        return kind, rel, [rel]
    if kind == "swap two chunks":
        rel = rng.choice(chunks)
        same = [c for c in chunks if c.split("/")[0] == rel.split("/")[0] and c != rel]
        other = rng.choice(same if same and rng.random() < 0.7 else [c for c in chunks
                                                                     if c != rel])
        a, b = (path / rel).read_bytes(), (path / other).read_bytes()
        (path / rel).write_bytes(b)
        (path / other).write_bytes(a)
        return kind, f"{rel} and {other}", [rel, other]
    if kind == "chunk of another store":
        rel = rng.choice(chunks)
        theirs = sorted(str(p.relative_to(donor)) for p in (donor / rel.split("/")[0]).glob("c.*"))
        source = rel if (donor / rel).exists() and rng.random() < 0.7 else rng.choice(theirs)
        shutil.copyfile(donor / source, path / rel)
        return kind, f"{rel} <- donor {source}", [rel]
    if kind == "garbage JSON":
        rel = rng.choice(jsons)
        garbage = rng.choice([*GARBAGE, rng.randbytes(rng.randint(1, 64)), None])
        if garbage is None:  # another JSON file of the store
            garbage = (path / rng.choice(jsons)).read_bytes()
        (path / rel).write_bytes(garbage)
        return kind, f"{rel} <- {garbage[:24]!r}", [rel]
    if kind == "swap two JSON files":
        rel = rng.choice(jsons)
        peers = [f for f in jsons if f != rel and kind_of(f) == kind_of(rel)] or \
            [f for f in jsons if f != rel]
        other = rng.choice(peers)
        a, b = (path / rel).read_bytes(), (path / other).read_bytes()
        (path / rel).write_bytes(b)
        (path / other).write_bytes(a)
        return kind, f"{rel} and {other}", [rel, other]
    if kind == "delete a folder":
        folders = sorted({f.rsplit("/", 1)[0] for f in files if "/" in f})
        folder = rng.choice(folders)
        shutil.rmtree(path / folder)
        return kind, folder, [folder]
    target.unlink()
    return "delete", rel, [rel]


def read_back(path: Path, expected: dict[str, np.ndarray | None]) -> tuple[str, str]:
    """Open and read every variable: same, refused (a LayerscopeError), wrong or untyped."""
    try:
        ds = layerscope.open_trace(path)
        wrong, refused = compare(ds, expected)
    except LayerscopeError as exc:
        return "refused", type(exc).__name__
    except Exception as exc:
        return "untyped", "".join(traceback.format_exception(exc))[-1200:]
    if wrong:
        return "wrong", "; ".join(wrong)[:600]
    return ("refused", "; ".join(refused)[:200]) if refused else ("same", "")


def verify_store(path: Path, damaged_chunks: list[str]) -> tuple[str, bool]:
    """(ok, damaged, refused or untyped: ...), and whether every damaged chunk is named."""
    try:
        report = layerscope.verify(path)
    except LayerscopeError:
        return "refused", True
    except Exception as exc:
        return "untyped: " + "".join(traceback.format_exception(exc))[-1200:], True
    named = {fault.key for fault in report.faults}
    return ("ok" if report.ok else "damaged"), all(c in named for c in damaged_chunks)


def changed_chunks(path: Path, pristine: Path, touched: list[str]) -> list[str]:
    """The chunk files among ``touched`` (files or folders) that differ from the pristine."""
    out = []
    for rel in touched:
        inside = [str(p.relative_to(pristine)) for p in (pristine / rel).rglob("*")
                  if p.is_file()] if (pristine / rel).is_dir() else [rel]
        for name in inside:
            file = path / name
            if kind_of(name) == "chunk" and (not file.is_file() or
                                             file.read_bytes() != (pristine / name).read_bytes()):
                out.append(name)
    return out


def build_stores(root: Path, work: Workload, send: Send) -> None:
    """In a child: the pristine stores and their donors."""
    for number, (name, (_, options)) in enumerate(STORES.items()):
        for donor in (0, 1):
            session = PRISTINE_SESSION + 2 * number + donor
            folder = root / ("donors" if donor else "pristine")
            folder.mkdir(parents=True, exist_ok=True)
            write_session(folder / name, "w-", session, len(work.sizes[session]), options, work,
                          send)


def damage_worker(args: argparse.Namespace, work: Workload, root: Path, trials: list[int],
                  send: Send) -> None:
    """In a child: damage, read and verify, trial after trial."""
    expected, copies = {}, {}
    for number, name in enumerate(STORES):
        expected[name] = work.expected([PRISTINE_SESSION + 2 * number] * len(STORES[name][0]))
        wrong, refused = compare(layerscope.open_trace(root / "pristine" / name), expected[name])
        if wrong or refused or not layerscope.verify(root / "pristine" / name).ok:
            raise RuntimeError(f"the pristine store {name} does not read back: {wrong}{refused}")
        copies[name] = root / f"work{os.getpid()}" / name
        shutil.rmtree(copies[name], ignore_errors=True)
        shutil.copytree(root / "pristine" / name, copies[name])
    files = {name: listing(root / "pristine" / name) for name in STORES}
    for trial in trials:
        send({"k": "start", "trial": trial})
        rng = random.Random(f"{args.seed}:damage:{trial}")
        name = rng.choice(list(STORES))
        path, pristine = copies[name], root / "pristine" / name
        kind, what, touched = damage(rng, path, root / "donors" / name)
        chunks = changed_chunks(path, pristine, touched)
        read, detail = read_back(path, expected[name])
        verified, named = verify_store(path, chunks)
        send({"k": "result", "trial": trial, "store": name, "kind": kind, "what": what,
              "read": read, "detail": detail, "verify": verified, "named": named})
        if args.keep and (read in ("wrong", "untyped") or verified.startswith("untyped")):
            shutil.copytree(path, Path(args.keep) / f"damage{trial}", dirs_exist_ok=True)
        for rel in touched:  # put back what was damaged
            if (pristine / rel).is_dir():
                shutil.rmtree(path / rel, ignore_errors=True)
                shutil.copytree(pristine / rel, path / rel)
            else:
                (path / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(pristine / rel, path / rel)
        if listing(path) != files[name]:
            shutil.rmtree(path)
            shutil.copytree(pristine, path)


class DamageCampaign:
    def __init__(self, args: argparse.Namespace, work: Workload, root: Path) -> None:
        self.args, self.work, self.root = args, work, root
        self.counts: Counter[str] = Counter()
        self.kinds: dict[str, Counter[str]] = {kind: Counter() for kind in DAMAGES}
        self.failures: list[str] = []

    def run(self, only: int | None) -> None:
        for number, (sizes, _) in enumerate(STORES.values()):
            self.work.sizes[PRISTINE_SESSION + 2 * number] = sizes
            self.work.sizes[PRISTINE_SESSION + 2 * number + 1] = [*sizes, 4]
        built = run_child(lambda send: build_stores(self.root, self.work, send), 120)
        if built.code != 0:
            raise RuntimeError(f"building the stores failed: {built.messages[-1:]}")
        todo = [only] if only is not None else list(range(self.args.corruptions))
        while todo:
            self.worker(todo, verbose=only is not None)

    def worker(self, todo: list[int], verbose: bool) -> None:
        """One reader process works through ``todo``; a trial it does not finish (a hang, a
        crash) is counted, and the next worker goes on after it."""
        current: list[int] = []

        def on_message(message: dict[str, Any]) -> None:
            if message["k"] == "start":
                current[:] = [message["trial"]]
            elif message["k"] == "result":
                self.tally(message, verbose)
                todo.remove(message["trial"])
                current.clear()

        trials = list(todo)
        out = run_child(lambda send: damage_worker(self.args, self.work, self.root, trials,
                                                   send), self.args.timeout,
                        on_message=on_message)
        if current:  # the worker stopped inside a trial
            trial = current[0]
            self.counts["trials"] += 1
            if out.hung:
                self.fail("hangs", f"damage trial {trial}: no answer in {self.args.timeout} s")
            else:
                error = next((m["error"] for m in out.messages if "error" in m), "")
                self.fail("untyped errors", f"damage trial {trial}: the reader process "
                          f"ended with status {out.code} {error}")
            todo.remove(trial)
        elif out.code != 0:
            error = next((m["error"] for m in out.messages if "error" in m), out.code)
            raise RuntimeError(f"the damage worker failed outside a trial: {error}")

    def tally(self, result: dict[str, Any], verbose: bool) -> None:
        kind, read, verified = result["kind"], result["read"], result["verify"]
        where = (f"damage trial {result['trial']} ({result['store']}, {kind}: "
                 f"{result['what']})")
        if verbose:
            print(f"{where}: read {read} {result['detail'][:300]}; verify {verified[:300]}")
        self.counts["trials"] += 1
        counts = self.kinds[kind]
        counts["trials"] += 1
        if read == "wrong":
            self.fail("silently wrong reads", f"{where}: {result['detail']}")
        if read == "untyped" or verified.startswith("untyped"):
            self.fail("untyped errors", f"{where}: {result['detail'] or verified}")
        flagged = verified in ("damaged", "refused")
        for name, hit in [("detected by reads", read == "refused"),
                          ("detected by verify", flagged),
                          ("nothing observable", read == "same" and verified == "ok"),
                          ("reads refused, verify said ok", read == "refused" and not flagged),
                          ("a damaged chunk verify did not name", not result["named"])]:
            self.counts[name] += hit
            counts[name] += hit
        if not result["named"] or read == "refused" and not flagged:
            self.failures.append(f"(informative) seed {self.args.seed}: {where}: read {read}, "
                                 f"verify {verified}, damaged chunks named: {result['named']}")

    def fail(self, count: str, message: str) -> None:
        self.counts[count] += 1
        self.failures.append(f"seed {self.args.seed}: {message}")



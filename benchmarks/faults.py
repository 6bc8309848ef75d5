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
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from _common import Outcome, Send, run_child

import layerscope
from layerscope import LayerscopeError
from layerscope.core import Compression, Selection, StoreOptions
from layerscope.core.chunking import ChunkPolicy
from layerscope.core.format import new_group_attrs
from layerscope.core.recorder import Recorder
from layerscope.core.store import open_group_for_writing
from layerscope.core.writer import TraceWriter

# -- the workload --------------------------------------------------------------------------------

#: variable -> (site, kind, roles); block.1 and head are skipped in some batches
SITES = {
    "embed@output": ("embed", "output", ("batch", "token", "embedding")),  # 6 KiB a sample
    "block.0@output": ("block.0", "output", ("batch", "token", "hidden")),
    "block.0@attention": ("block.0", "attention", ("batch", "head", "query", "key")),  # sparse
    "block.1@output": ("block.1", "output", ("batch", "token", "hidden")),
    "head@logits": ("head", "logits", ("batch", "token")),
}
LABELS = ("token_id", "batch")


@dataclass
class Workload:
    """The data of batch ``n`` written by session ``session``: a function of both only."""

    seed: int
    sizes: dict[int, list[int]] = field(default_factory=dict)  # fixed sizes of some sessions

    def arrays(self, session: int, n: int) -> dict[str, np.ndarray]:
        pick = random.Random(f"{self.seed}:{session}:{n}")
        fixed = self.sizes.get(session)
        size = fixed[n] if fixed else pick.randint(1, 6)
        skip1, skip_head = pick.random() < 0.4, pick.random() < 0.2
        g = np.random.default_rng([self.seed, session, n])
        out = {
            "embed@output": g.standard_normal((size, 6, 256), dtype=np.float32),
            "block.0@output": g.standard_normal((size, 6, 8), dtype=np.float32),
            "block.0@attention": np.tril(g.random((size, 2, 16, 16), dtype=np.float32)),
            "block.1@output": g.standard_normal((size, 6, 8), dtype=np.float32),
            "head@logits": g.integers(-1000, 1000, (size, 6), dtype=np.int32),
            "token_id": g.integers(0, 30000, (size, 6), dtype=np.int64),
        }
        if skip1:
            del out["block.1@output"]
        if skip_head:
            del out["head@logits"]
        return out

    def expected(self, owners: list[int]) -> dict[str, np.ndarray | None]:
        """Each variable's values for committed batches written by ``owners`` (session of
        batch n); None for one no committed batch holds (absent, or fill values only)."""
        batches = [self.arrays(s, n) for n, s in enumerate(owners)]
        out: dict[str, np.ndarray | None] = {}
        for name in (*SITES, "token_id"):
            shapes = [b.get(name) for b in batches]
            known = next((a for a in shapes if a is not None), None)
            if known is None:
                out[name] = None
                continue
            fill = np.nan if known.dtype.kind == "f" else 0
            out[name] = np.concatenate([
                a if a is not None else np.full((len(b["token_id"]), *known.shape[1:]), fill,
                                                known.dtype)
                for a, b in zip(shapes, batches, strict=True)])
        rows = sum(len(b["token_id"]) for b in batches)
        out["batch"] = np.arange(rows, dtype=np.int64)
        return out


def write_session(path: Path, mode: str, session: int, batches: int, options: StoreOptions,
                  work: Workload, send: Send) -> None:
    """One writer: open ``path`` with ``mode``, trace ``batches`` batches, close."""
    attrs = new_group_attrs("numpy", "0", {"class": "faults"}, Selection().to_json())
    group, existing = open_group_for_writing(path, mode, attrs)
    start = int(existing.get("committed_batches", 0))
    writer = TraceWriter(group, replace(options, mode=mode),
                         int(existing.get("committed_samples", 0)), start)
    recorder = Recorder(writer, Selection(), "numpy")
    send({"k": "open", "start": start})
    for n in range(start, start + batches):
        arrays = work.arrays(session, n)
        recorder.begin_pass(len(arrays["token_id"]), token_ids=arrays["token_id"])
        for name, (site, kind, roles) in SITES.items():
            if name in arrays:
                recorder.put(site, kind, arrays[name], roles)
        recorder.end_pass()
    recorder.close()
    send({"k": "done", "n": start + batches})


def compare(ds: Any, expected: dict[str, np.ndarray | None]) -> tuple[list[str], list[str]]:
    """Read every variable of ``ds``: (silently wrong ones, refused ones); untyped errors
    propagate. A variable no committed batch holds may be absent or hold fill values only."""
    wrong, refused = [], []
    known = {*SITES, *LABELS}
    for name in ds.data_vars:
        if str(name) not in known:
            wrong.append(f"{name}: a variable that was never written")
    for name, want in expected.items():
        if name not in ds.variables:
            if want is not None and len(want):
                wrong.append(f"{name}: missing")
            continue
        try:
            got = ds[name].values
        except LayerscopeError as exc:
            refused.append(f"{name}: {type(exc).__name__}")
            continue
        if want is None:
            if got.dtype.kind == "f" and not np.isnan(got).all() or \
                    got.dtype.kind != "f" and got.any():
                wrong.append(f"{name}: values where no committed batch wrote any")
        elif got.dtype != want.dtype or got.shape != want.shape:
            wrong.append(f"{name}: {got.dtype}{got.shape} instead of {want.dtype}{want.shape}")
        elif not np.array_equal(got, want, equal_nan=True):
            rows = np.flatnonzero([not np.array_equal(a, b, equal_nan=True)
                                   for a, b in zip(got, want, strict=True)])
            wrong.append(f"{name}: rows {rows[:8].tolist()} differ")
    return wrong, refused


# -- kills ---------------------------------------------------------------------------------------

#: kill points: (module or class path, attribute, calls per batch it is expected about)
POINTS = {
    "chunk file": ("layerscope.core.chunkfile:ChunkFiles", "write", 5),
    "zarr write": ("zarr.storage:LocalStore", "set", 3),
    "manifest": ("layerscope.core.writer", "write_manifest", 1),
    "commit": ("layerscope.core.writer", "publish", 1),
    "rename": ("os", "replace", 2),
    "unlink": ("os", "unlink", 2),
    "clear old store": ("layerscope.core.store", "_remove", 1),
    "first root document": ("layerscope.core.store", "write_root", 0),
}


def _resolve(where: str) -> Any:
    import importlib

    module, _, name = where.partition(":")
    owner = importlib.import_module(module)
    return getattr(owner, name) if name else owner


def kill_at(point: str, nth: int) -> bool:
    """In a writer child: SIGKILL itself at the ``nth`` call of ``point``; False when the
    library no longer has that function (the kill then comes from the timer)."""
    import inspect

    where, name, _ = POINTS[point]
    owner = _resolve(where)
    original = getattr(owner, name, None)
    if original is None:
        return False
    calls = [0]

    def count() -> None:
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    if inspect.iscoroutinefunction(original):
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            count()
            return await original(*args, **kwargs)
        setattr(owner, name, wrapped_async)
    else:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            count()
            return original(*args, **kwargs)
        setattr(owner, name, wrapped)
    return True


def report_commits(send: Send) -> None:
    """In a writer child: say the committed count after each root document is published."""
    import layerscope.core.writer as writer_module

    original = getattr(writer_module, "publish", None)
    if original is None:
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        attrs = args[1] if len(args) > 1 else kwargs.get("attrs", {})
        send({"k": "commit", "n": int(attrs.get("committed_batches", 0))})
        return result

    writer_module.publish = wrapped


@dataclass(frozen=True)
class Candidate:
    """What a store may hold: batches ``base`` then ``session``'s, low..high in all."""

    label: str
    base: tuple[int, ...]
    session: int | None
    low: int
    high: int

    def owners(self, count: int) -> list[int] | None:
        extra = count - len(self.base)
        if extra > 0 and self.session is None:
            return None
        return [*self.base, *[self.session or 0] * max(0, extra)][:count]


def check_store(path: Path, candidates: list[Candidate], refuse_ok: bool, complete: bool,
                work: Workload, send: Send) -> None:
    """In a checker child: the store matches a candidate, or is refused where allowed."""
    problems: list[list[str]] = []
    result: dict[str, Any] = {"k": "check", "problems": problems}
    try:
        ds = layerscope.open_trace(path)
    except LayerscopeError as exc:
        result.update(state="refused", error=f"{type(exc).__name__}: {exc}"[:300])
        if not refuse_ok:
            problems.append(["lost", f"refused after commits: {result['error']}"])
        send(result)
        return
    count = int(ds.attrs.get("committed_batches", 0))
    result.update(state="opened", count=count, status=ds.attrs.get("status"))
    tried = []
    for candidate in sorted(candidates, key=lambda c: not c.low <= count <= c.high):
        owners = candidate.owners(count)
        if owners is None:
            continue
        wrong, refused = compare(ds, work.expected(owners))
        tried.append((candidate, wrong, refused))
        if not wrong and not refused:
            result.update(matched=candidate.label, owners=owners)
            if not candidate.low <= count <= candidate.high:
                problems.append(["lost" if count < candidate.low else "wrong",
                                 f"{count} committed batches, expected {candidate.label} "
                                 f"with {candidate.low}..{candidate.high}"])
            break
    else:
        if any(refused and not wrong for _, wrong, refused in tried):
            refused = next(r for _, w, r in tried if r and not w)
            problems.append(["lost", f"committed rows unreadable: {refused[:3]}"])
        else:
            detail = "; ".join(f"{c.label}: {w[:3]}" for c, w, _ in tried)
            problems.append(["wrong", f"{count} committed batches match no writer ({detail})"])
    if complete and result.get("status") != "complete":
        problems.append(["failed", f"a writer that finished left status {result['status']!r}"])
    try:
        report = layerscope.verify(path)
        result["verify_ok"] = report.ok
        if not report.ok:
            result["verify"] = report.summary()[:300]
    except LayerscopeError as exc:
        result.update(verify_ok=False, verify=f"{type(exc).__name__}: {exc}"[:300])
    send(result)


@dataclass
class Chain:
    number: int
    path: Path
    options: StoreOptions
    owners: list[int] | None = None  # sessions of the committed batches; None: no open store
    exists: bool = False
    sessions: int = 0
    poisoned: bool = False  # a must-be-zero count was found: replaced before going on

    def session(self) -> int:
        self.sessions += 1
        return self.number * 1000 + self.sessions


class KillCampaign:
    CHAIN = 10  # kill trials per chain

    def __init__(self, args: argparse.Namespace, work: Workload, roots: dict[str, Path]) -> None:
        self.args, self.work, self.roots = args, work, roots
        self.counts: Counter[str] = Counter()
        self.points: Counter[str] = Counter()
        self.failures: list[str] = []
        self.per_open, self.per_batch = 0.05, 0.02  # seconds, learned from finished writers

    def chain(self, number: int) -> Chain:
        rng = random.Random(f"{self.args.seed}:chain:{number}")
        root = self.roots["disk" if rng.random() < 0.2 else "tmpfs"]
        options = StoreOptions(
            durable=rng.random() < 0.2,
            chunks=ChunkPolicy(target_bytes=4096) if rng.random() < 0.3 else ChunkPolicy(),
            compression=Compression(min_saving=0) if rng.random() < 0.2 else Compression())
        return Chain(number, root / f"chain{number}.zarr", options)

    def run(self, only: int | None) -> None:
        kills, trial = 0, 0
        if only is not None:
            trial = only - only % self.CHAIN
        chain = None
        while (kills < self.args.kills and trial < 3 * self.args.kills + 10) if only is None \
                else trial <= only:
            if trial % self.CHAIN == 0:
                if chain is not None:
                    self.finish(chain, trial - 1)
                chain = self.chain(trial // self.CHAIN)
            assert chain is not None
            kills += self.trial(chain, trial, verbose=only is not None)
            trial += 1
        if chain is not None:
            self.finish(chain, trial - 1)
        self.counts["trials"] = trial if only is None else 1

    def finish(self, chain: Chain, trial: int) -> None:
        if chain.owners is None and chain.exists:
            self.clean(chain, trial, "w", needed=True)
        shutil.rmtree(chain.path, ignore_errors=True)

    def trial(self, chain: Chain, trial: int, verbose: bool) -> int:
        rng = random.Random(f"{self.args.seed}:kill:{trial}")
        if chain.poisoned:  # count each failure once: start again from a new store
            chain.poisoned = False
            self.clean(chain, trial, "w", needed=False)
        if chain.owners is None and chain.exists:
            if rng.random() < 0.5:  # appending to what a kill left: created, or refused
                self.session(chain, trial, "a", rng, kill=False, verbose=verbose, tag="append "
                             "to a refused store")
            if chain.owners is None:
                self.clean(chain, trial, "w", needed=True)
        if not chain.exists:
            mode = "w-"
        else:
            mode = rng.choices(["a", "w", "w-"], [0.62, 0.33, 0.05])[0]
        killed = self.session(chain, trial, mode, rng, kill=True, verbose=verbose)
        if rng.random() < 0.3:  # a writer that runs to its end after the kill
            self.clean(chain, trial, "a" if chain.owners is not None else "w",
                       needed=chain.owners is None and chain.exists)
        return killed

    def clean(self, chain: Chain, trial: int, mode: str, needed: bool) -> None:
        if needed:
            self.counts["needed mode='w'"] += 1
        rng = random.Random(f"{self.args.seed}:clean:{trial}:{chain.sessions}")
        self.session(chain, trial, mode, rng, kill=False, verbose=False)

    def session(self, chain: Chain, trial: int, mode: str, rng: random.Random, kill: bool,
                verbose: bool, tag: str = "") -> int:
        session, batches = chain.session(), rng.randint(1, 8)
        point, nth, delay = "", 0, None
        if kill and rng.random() < 0.35:
            point = rng.choice([p for p in POINTS if p != "clear old store" or mode == "w"])
            nth = rng.randint(1, max(1, POINTS[point][2] * batches + 3))
        elif kill:
            delay = rng.uniform(0, 1.1 * (self.per_open + self.per_batch * batches))
        prior = chain.owners

        def body(send: Send) -> None:
            report_commits(send)
            if point and not kill_at(point, nth):
                send({"k": "no hook"})
            write_session(chain.path, mode, session, batches, chain.options, self.work, send)

        out = run_child(body, self.args.timeout, kill_after=delay)
        if any(m.get("k") == "no hook" for m in out.messages):
            self.counts["kill points missing"] += 1
        chain.exists = chain.exists or chain.path.exists()
        done = out.code == 0
        reported = max([m["n"] for m in out.messages if m.get("k") == "commit"], default=-1)
        died = out.code == -signal.SIGKILL and not out.hung
        what = (f"kill trial {trial} (chain {chain.number}, {mode!r}, {batches} batches, "
                + (f"kill at call {nth} of {point}" if point else
                   f"kill after {delay * 1000:.0f} ms" if delay is not None else "no kill")
                + f"{', ' + tag if tag else ''})")
        if out.hung:
            self.fail("hangs", f"{what}: the writer made no progress for {self.args.timeout} s")
        if out.code == 4 or out.code not in (0, 3, -signal.SIGKILL):
            error = next((m["error"] for m in out.messages if m.get("k") == "untyped"),
                         f"exit status {out.code}")
            self.fail("untyped errors", f"{what}: the writer raised {error}")
        typed = next((m["error"] for m in out.messages if m.get("k") == "typed"), None)
        refusal = mode == "w-" and prior is not None or mode == "a" and prior is None
        if typed and not refusal:
            self.fail("writes that failed", f"{what}: the writer raised {typed}")
        if kill:
            self.counts["SIGKILLs"] += died
            self.counts["finished before the kill"] += done
            self.points["at a chosen point" if point else "at a random moment"] += died
        if done:
            opened = out.opened if out.opened is not None else self.per_open
            self.per_open += 0.2 * (opened - self.per_open)
            self.per_batch += 0.2 * ((out.seconds - opened) / batches - self.per_batch)
        elif not kill and not (refusal and out.code == 3):
            self.fail("writes that failed", f"{what}: exit status {out.code}, {typed}")
        candidates, refuse_ok = self.expect(chain, mode, prior, session, batches, reported, out)
        finished = done and not refusal
        result = self.check(chain, candidates, refuse_ok, finished, what)
        if verbose:
            print(f"{what}: exit {out.code}, commits seen {reported}, store "
                  f"{result.get('state')} {result.get('matched', '')} "
                  f"{result.get('count', '')} {result.get('problems') or ''}")
        return int(died and kill)

    def expect(self, chain: Chain, mode: str, prior: list[int] | None, session: int,
               batches: int, reported: int, out: Outcome) -> tuple[list[Candidate], bool]:
        done = out.code == 0
        old = [] if prior is None else [Candidate("the old store", tuple(prior), None,
                                                  len(prior), len(prior))]
        if out.code not in (0, -signal.SIGKILL) or out.hung:  # anything that is not wrong
            base = tuple(prior or ()) if mode == "a" else ()
            return old + [Candidate("any", base, session, 0, len(base) + batches)], True
        if mode == "w-" and prior is not None or mode == "a" and prior is None and \
                out.code == 3:
            return old, prior is None
        if mode == "a" and prior is not None:
            low = max(len(prior), reported) if not done else len(prior) + batches
            return [Candidate("append", tuple(prior), session, low,
                              len(prior) + batches)], False
        new = Candidate("the new store", (), session, batches if done else max(0, reported),
                        batches)
        if reported >= 0 or done:
            return [new], False
        return old + [new], True

    def check(self, chain: Chain, candidates: list[Candidate], refuse_ok: bool, complete: bool,
              what: str) -> dict[str, Any]:
        out = run_child(lambda send: check_store(chain.path, candidates, refuse_ok, complete,
                                                 self.work, send), self.args.timeout)
        result = next((m for m in out.messages if m.get("k") == "check"), {})
        if out.hung:
            self.fail("hangs", f"{what}: the check made no progress for {self.args.timeout} s")
        elif out.code != 0:
            error = next((m["error"] for m in out.messages if "error" in m), out.code)
            self.fail("untyped errors", f"{what}: reading the store raised {error}")
        for kind, message in result.get("problems", []):
            name = {"lost": "committed data lost", "wrong": "silently wrong reads",
                    "failed": "writes that failed"}[kind]
            self.fail(name, f"{what}: {message}")
        if self.args.keep and (result.get("problems") or out.code != 0 or out.hung):
            shutil.copytree(chain.path, Path(self.args.keep) / f"kill{chain.number}."
                            f"{chain.sessions}", dirs_exist_ok=True)
        if result.get("problems") or out.code != 0 or out.hung:
            chain.owners, chain.poisoned = None, True
        elif result.get("state") == "refused":
            self.counts["stores refused cleanly"] += 1
            chain.owners = None
        elif "owners" in result:
            chain.owners = result["owners"]
            if not result.get("verify_ok", True):
                self.counts["verify flagged a killed store"] += 1
                self.failures.append(f"(informative) {what}: verify: {result.get('verify')}")
        else:
            chain.owners = None  # unknown: the next writer replaces it
        self.counts["checks"] += 1
        return result

    def fail(self, count: str, message: str) -> None:
        self.counts[count] += 1
        self.failures.append(f"seed {self.args.seed}: {message}")


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

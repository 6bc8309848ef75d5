"""The fault campaign's kills (benchmarks/faults.py): writers SIGKILLed at random moments
and at chosen steps, each store checked after each writer."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import Outcome, Send, run_child
from _faults_workload import Workload, compare, write_session

import layerscope
from layerscope import LayerscopeError
from layerscope.core import Compression, StoreOptions
from layerscope.core.chunking import ChunkPolicy

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



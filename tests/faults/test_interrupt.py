"""Ctrl-C at any moment of a capture never deadlocks and never damages committed batches
(issue 14, item 8). A child process takes KeyboardInterrupts at random moments, from a timer
signal, while the writer is busy (tiny host budget, so the caller waits for room often); the
parent's timeout turns a deadlock into a failure."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import random, signal, sys, tempfile, threading, warnings
    from pathlib import Path
    import numpy as np
    import layerscope
    from layerscope.core import Selection, StoreOptions
    from layerscope.core.format import new_group_attrs
    from layerscope.core.hostpool import HostPool
    from layerscope.core.recorder import Recorder
    from layerscope.core.store import open_group_for_writing
    from layerscope.core.writer import TraceWriter

    MODE = sys.argv[1]
    rng = random.Random(int(sys.argv[2]))

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, interrupt)
    if MODE == "inject":  # raise it inside the waits and bookkeeping of the caller's side
        def injecting(cls, name):
            original = getattr(cls, name)
            def wrapped(self, *args, **kwargs):
                main = threading.current_thread() is threading.main_thread()
                if main and rng.random() < 0.03:
                    raise KeyboardInterrupt
                result = original(self, *args, **kwargs)
                if main and rng.random() < 0.03:
                    raise KeyboardInterrupt
                return result
            setattr(cls, name, wrapped)
        for cls, name in [(HostPool, "acquire"), (HostPool, "take"), (HostPool, "give"),
                          (TraceWriter, "discard_batch"), (TraceWriter, "end_batch"),
                          (TraceWriter, "put")]:
            injecting(cls, name)

    root = Path(tempfile.mkdtemp())
    interrupted = 0
    for trial in range(int(sys.argv[3])):
        path = root / f"t{trial}.zarr"
        attrs = new_group_attrs("numpy", "0", {"class": "test"}, Selection().to_json())
        group, existing = open_group_for_writing(path, "w-", attrs)
        writer = TraceWriter(group, StoreOptions(max_pending_bytes=3000, workers=2))
        recorder = Recorder(writer, Selection(), "numpy")
        put = []
        if MODE == "signal":
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0005, 0.05))
        try:
            try:
                for number in range(30):
                    size = rng.choice([4, 4, 3])
                    data = np.random.default_rng(number).standard_normal((size, 6, 8),
                                                                          np.float32)
                    recorder.begin_pass(size)
                    try:
                        recorder.put("a", "output", data, ("batch", "token", "hidden"))
                        recorder.put("b", "output", data * 2, ("batch", "token", "hidden"),
                                     snapshot=lambda t, alloc: _copy(t, alloc))
                    except BaseException:
                        recorder.abort_pass()
                        raise
                    put.append(data)
                    recorder.end_pass()
            except BaseException:
                recorder.close(failed=True)
                raise
            recorder.close()
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        try:  # a second interrupt may have ended the close itself: the store still opens
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = layerscope.open_trace(path)
        except layerscope.StoreError:
            continue  # interrupted before its first commit
        rows = int(ds.attrs["committed_samples"])
        if rows:
            expected = np.concatenate(put)[:rows]
            assert (ds["a@output"].values == expected).all(), trial
            assert (ds["b@output"].values == expected * 2).all(), trial
    print("interrupted", interrupted)
""")

COPY = textwrap.dedent("""
    def _copy(t, alloc):
        out = alloc(t.shape, t.dtype)
        out[...] = t
        return out
""")


def run_child(tmp_path, mode, seed, trials, timeout=40):
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("MODE = sys.argv[1]", COPY + "MODE = sys.argv[1]"))
    try:
        done = subprocess.run([sys.executable, "-P", str(script), mode, str(seed), str(trials)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"deadlock: {mode} seed {seed} still running after {timeout} s"
                             ) from exc
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


def test_ctrl_c_from_a_timer_at_random_moments_never_deadlocks(tmp_path):
    interrupted = sum(run_child(tmp_path, "signal", seed, 25) for seed in (1, 2))
    assert interrupted > 10  # the interrupts did land


def test_ctrl_c_inside_the_waits_and_bookkeeping_never_deadlocks(tmp_path):
    assert run_child(tmp_path, "inject", 3, 25) > 10

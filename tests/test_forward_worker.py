"""The server's worker of batched forward passes (server.state.ForwardWorker) and the thread names and
priorities it relies on: one job at a time, never started past its request's deadline or after its
request ended, on a thread below decoding's priority -- with TensorFlow's own compute threads -- where
decoding does not run on TensorFlow."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server.requests import ApiError
from server.state import FORWARD_NICENESS, ForwardWorker

ROOT = Path(__file__).resolve().parent.parent
LINUX = sys.platform.startswith("linux")


def _blocker():
    """A job that runs until released, and the events that say it started and let it go."""
    started, release = threading.Event(), threading.Event()

    def work(cancelled):
        started.set()
        release.wait(30)
        return "first"

    return work, started, release


def _busy(worker):
    """``worker`` running a job of another request until the returned event is set."""
    work, started, release = _blocker()
    threading.Thread(target=worker.run, args=(work, time.monotonic() + 30, threading.Event()), daemon=True).start()
    assert started.wait(10)
    return release


def test_jobs_run_one_at_a_time_in_order_and_return_their_results():
    worker = ForwardWorker()
    work, started, release = _blocker()
    results = {}
    first = threading.Thread(target=lambda: results.update(a=worker.run(work, time.monotonic() + 30,
                                                                          threading.Event())))
    first.start()
    assert started.wait(10)
    ran = []
    second = threading.Thread(target=lambda: results.update(b=worker.run(lambda c: ran.append(1) or "second",
                                                                          time.monotonic() + 30, threading.Event())))
    second.start()
    second.join(0.2)
    assert second.is_alive() and not ran  # waits for the first one
    release.set()
    first.join(10), second.join(10)
    assert results == {"a": "first", "b": "second"} and ran == [1]
    worker.close()


def test_a_job_that_cannot_start_before_its_deadline_never_starts():
    worker = ForwardWorker()
    release = _busy(worker)
    ran = []
    t0 = time.monotonic()
    with pytest.raises(ApiError) as e:
        worker.run(lambda c: ran.append(1), time.monotonic() + 0.3, threading.Event())
    assert e.value.status == 504 and "deadline" in e.value.message
    assert 0.25 <= time.monotonic() - t0 < 5
    release.set()
    done = threading.Event()
    worker.run(lambda c: done.set(), time.monotonic() + 30, threading.Event())  # after the skipped one
    assert done.is_set() and not ran  # the abandoned job was skipped, not run late
    worker.close()


def test_a_job_whose_request_ended_before_it_started_never_starts():
    worker = ForwardWorker()
    release = _busy(worker)
    cancelled, ran, errors = threading.Event(), [], []

    def waiting():
        try:
            worker.run(lambda c: ran.append(1), time.monotonic() + 30, cancelled)
        except ApiError as e:
            errors.append(e.status)

    t = threading.Thread(target=waiting)
    t.start()
    cancelled.set()  # the client hung up while it waited
    release.set()
    t.join(10)
    assert errors == [504] and not ran
    worker.close()


def test_the_waiting_thread_is_let_go_as_soon_as_its_request_ends():
    """A request's worker thread waits for its job only while the request lasts: when the client hangs up
    during a long forward pass, the thread returns at once (the job stops at its next check), so that
    requests that ended never tie up the server's threads."""
    worker = ForwardWorker()
    cancelled, in_pass, finish = threading.Event(), threading.Event(), threading.Event()

    def work(c):
        in_pass.set()
        finish.wait(30)  # one long forward pass: the request's end is seen only after it
        return None if c.is_set() else "done"

    out = []
    waiting = threading.Thread(target=lambda: out.append(worker.run(work, time.monotonic() + 30, cancelled)))
    waiting.start()
    assert in_pass.wait(10)
    cancelled.set()  # the client hangs up in the middle of the pass
    waiting.join(10)
    assert not waiting.is_alive() and out == [None] and not finish.is_set()
    finish.set()
    assert worker.run(lambda c: 7, time.monotonic() + 30, threading.Event()) == 7  # the worker goes on
    worker.close()


def test_a_running_job_sees_its_request_end_and_errors_reach_the_request():
    worker = ForwardWorker()
    cancelled = threading.Event()

    def work(c):
        cancelled.set()  # (the request ends while the job runs: the job checks between its batches)
        return "stopped" if c.is_set() else "finished"

    assert worker.run(work, time.monotonic() + 30, cancelled) == "stopped"
    with pytest.raises(MemoryError):
        worker.run(lambda c: (_ for _ in ()).throw(MemoryError()), time.monotonic() + 30, threading.Event())
    assert worker.run(lambda c: 7, time.monotonic() + 30, threading.Event()) == 7  # it serves on
    worker.close()


@pytest.mark.skipif(not LINUX, reason="per-thread nice values are Linux's")
@pytest.mark.parametrize("lower", [True, False])
def test_the_worker_thread_runs_below_decoding_only_where_decoding_is_elsewhere(lower):
    worker = ForwardWorker(lambda: lower)
    seen = worker.run(lambda c: (threading.current_thread().name,
                                 os.getpriority(os.PRIO_PROCESS, threading.get_native_id())),
                      time.monotonic() + 30, threading.Event())
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == ("forward", max(base, FORWARD_NICENESS) if lower else base)
    worker.close()


@pytest.mark.skipif(not LINUX, reason="thread names are read from /proc")
def test_model_load_names_tensorflows_unnamed_compute_threads():
    """TensorFlow leaves its intra-op pool unnamed (the process's name): model.load names the threads it
    starts ``tf_intra`` so that their priority can be lowered with the rest of ``tf_*``; Python threads
    and threads with a name of their own keep theirs."""
    code = """
import os, sys, threading
sys.path.insert(0, sys.argv[1])
import model
model.configure_threads(2)
mine = threading.Thread(target=threading.Event().wait, args=(5,), name="mine", daemon=True)
mine.start()
m = model.load(sys.argv[2])
m.hidden([[1, 2, 3] * 50] * 2)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
own = open(f"/proc/self/task/{mine.native_id}/comm").read().strip()
print(names.count("tf_intra"), own, "tf_Compute" in names)
"""
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(ROOT / "tests" / "data" / "gpt2ja-tiny")],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="3"))
    assert out.returncode == 0, out.stderr[-2000:]
    count, own, compute = out.stdout.split()
    assert int(count) >= 1, out.stdout
    assert own != "tf_intra"  # a Python thread started before the load keeps its name
    assert compute == "True"  # TensorFlow's own names are kept

"""How many threads the model's CPU engines use (the tools' --threads).

    import model
    model.configure_threads(None)     # default: the CPUs this process may run on, tuned while decoding
    model.configure_threads(1)        # exactly one thread everywhere

TensorFlow's thread pools get the count before TensorFlow starts (intra-op:
the count, inter-op: 1 -- the model's graphs are one chain of ops).  OpenBLAS,
which runs the numpy decoding steps, is set at run time through threadpoolctl.

Why decoding steps are tuned (measured on the reference machine, 2 cores,
small shape, batch 1): with the machine quiet, a second OpenBLAS thread makes
a step about 20% faster; with one other busy process, the second thread's
spin-waiting fights that process for the core and steps take 2.4x as long as
with one thread (0.42x of the quiet speed, against 0.9x with one thread).
Neither fixed count is right for both, so with the default policy a
decoder times its steps: now and then a few steps run with each candidate
count (one thread, all of them), interleaved, and the faster one is kept until
the next probe.  An explicit --threads N fixes the count and turns tuning off.

The cap: no pool gets more threads than the CPUs this process may run on
(``thread_cap()``, the affinity mask): the engines' work is compute-bound, so a
thread beyond that only waits for a core, and thousands of them (``--threads
10000`` once made 10,065 threads and a load average of 900) swamp the machine.
``configure_threads`` lowers a larger count to the cap; the tools' ``--threads``
says so in one line on stderr (``cli.flags``).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Dict, List, Optional

_POLICY: Dict[str, Optional[int]] = {"threads": None}
_BLAS: Optional[List] = None


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def thread_cap() -> int:
    """The most threads any pool gets: the CPUs this process may run on."""
    return cpu_count()


def configure_threads(threads: Optional[int] = None, tensorflow: bool = True) -> int:
    """Set the thread policy of this process: ``threads`` fixed (lowered to ``thread_cap()``), or
    None for the default (all CPUs, decoding steps tuned).  Call before the model is loaded,
    so that TensorFlow's pools are sized before TensorFlow starts (``tensorflow``
    False: TensorFlow is left alone, not even imported).  Returns the largest
    count any pool gets."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if threads is not None:
        threads = min(threads, thread_cap())
    _POLICY["threads"] = threads
    count = threads or cpu_count()
    set_blas_threads(count)
    if not tensorflow:  # a process that decodes without TensorFlow (quantized weights) must not load it
        return count
    from ._tf import import_tf

    tf = import_tf()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(count)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already started: its pools keep their sizes
        pass
    return count


@contextlib.contextmanager
def naming_tensorflow_threads(name: str = "tf_intra"):
    """Around the first TensorFlow work of a process (``model.load``): the native threads TensorFlow
    starts meanwhile -- its intra-op pool, which it leaves unnamed, while its inter-op threads are
    ``tf_Compute`` -- are named ``name``, so that a server can lower the CPU priority of every thread
    of its batched forward passes (``util.system.lower_thread_priority("tf_")``).  Nothing happens
    where TensorFlow already runs, or off Linux."""
    from util.system import name_new_native_threads, thread_ids

    before = thread_ids()
    try:
        yield
    finally:
        if before:
            name_new_native_threads(before, name)


def fixed_threads() -> Optional[int]:
    """The count --threads fixed, or None under the default (tuned) policy."""
    return _POLICY["threads"]


def _blas() -> List:
    global _BLAS
    if _BLAS is None:
        try:
            import numpy  # noqa: F401  (OpenBLAS must be loaded to be found)
            from threadpoolctl import ThreadpoolController

            _BLAS = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # no threadpoolctl, or a BLAS it does not know: leave BLAS alone
            _BLAS = []
    return _BLAS


def set_blas_threads(count: int) -> None:
    for lib in _blas():
        lib.set_num_threads(count)


class StepTuner:
    """Chooses the BLAS thread count of decoding steps by timing them.

    Steps are grouped by kind (a few rows: matrix-vector products; more:
    matrix products).  For each kind, a probe runs ``probe`` steps with each
    candidate count, alternating, and keeps the count with the lower median
    step time for the next ``period`` steps; then it probes again (a busy
    neighbour may come or go).  Usage: ``count = tuner.before(rows)``, run the
    step, ``tuner.after(rows, seconds)``.
    """

    def __init__(self, most: int, period: int = 64, probe: int = 3):
        self.candidates = [most, 1] if most > 1 else [1]
        self.period = period
        self.probe = probe
        self._state: Dict[str, dict] = {}

    @staticmethod
    def _kind(rows: int) -> str:
        return "few" if rows <= 3 else "many"

    def _of(self, rows: int) -> dict:
        return self._state.setdefault(self._kind(rows), {"best": self.candidates[0], "left": 0, "trial": [],
                                                          "times": {c: [] for c in self.candidates}})

    def before(self, rows: int) -> int:
        """The count to run the next step of ``rows`` rows with (set in BLAS)."""
        s = self._of(rows)
        if len(self.candidates) > 1 and s["left"] <= 0 and not s["trial"]:
            s["trial"] = self.candidates * self.probe  # alternate: A B A B A B
            for c in self.candidates:
                s["times"][c] = []
        count = s["trial"][0] if s["trial"] else s["best"]
        set_blas_threads(count)
        return count

    def after(self, rows: int, seconds: float) -> None:
        s = self._of(rows)
        if s["trial"]:
            count = s["trial"].pop(0)
            s["times"][count].append(seconds)
            if not s["trial"]:
                s["best"] = min(self.candidates, key=lambda c: sorted(s["times"][c])[len(s["times"][c]) // 2])
                s["left"] = self.period
        else:
            s["left"] -= 1

    def best(self, rows: int) -> int:
        return self._of(rows)["best"]


def timer() -> float:
    return time.perf_counter()

"""What this machine has to offer a process (no project imports here)."""
from __future__ import annotations

import os
from typing import Optional


def available_memory() -> Optional[int]:
    """Bytes of memory available to new allocations (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def thread_ids() -> set:
    """The native ids of this process's threads (Linux: /proc/self/task; elsewhere an empty set)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except (OSError, ValueError):
        return set()


def name_new_native_threads(before: set, name: str) -> int:
    """Name ``name`` (at most 15 bytes) the threads started since ``before`` (``thread_ids()``) that are
    not Python threads and have no name of their own (they bear the process's): the pools a native
    library started meanwhile and left unnamed, so that
    ``lower_thread_priority`` and ``top -H`` can tell them apart.  Returns how many were named."""
    import threading

    python = {t.native_id for t in threading.enumerate()}
    try:
        with open("/proc/self/comm", encoding="utf-8", errors="replace") as f:
            unnamed = f.read().strip()  # a thread nobody named has the process's name
    except OSError:
        return 0
    named = 0
    for tid in sorted(thread_ids() - before - python):
        try:
            path = f"/proc/self/task/{tid}/comm"
            with open(path, encoding="utf-8", errors="replace") as f:
                if f.read().strip() != unnamed:
                    continue  # named by its library (tf_Compute, ...)
            with open(path, "w", encoding="utf-8") as f:
                f.write(name[:15])
            named += 1
        except OSError:
            continue  # it ended meanwhile, or the system refuses
    return named


def lower_thread_priority(prefix: str, niceness: int = 10) -> int:
    """Raise to ``niceness`` the nice value of this process's threads whose name starts with
    ``prefix`` (Linux: /proc/self/task/*/comm; elsewhere nothing happens).  Threads already at it or
    above are left alone (a nice value is never lowered: that needs privileges).  Returns how many
    threads were changed."""

    changed = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
                name = f.read().strip()
            if not name.startswith(prefix):
                continue
            if os.getpriority(os.PRIO_PROCESS, int(tid)) < niceness:
                os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
                changed += 1
        except (OSError, ValueError):
            continue  # the thread ended meanwhile, or the system refuses
    return changed

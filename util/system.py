"""What this machine has to offer a process (no project imports here)."""
from __future__ import annotations

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


def lower_thread_priority(prefix: str, niceness: int = 10) -> int:
    """Raise to ``niceness`` the nice value of this process's threads whose name starts with
    ``prefix`` (Linux: /proc/self/task/*/comm; elsewhere nothing happens).  Threads already at it or
    above are left alone (a nice value is never lowered: that needs privileges).  Returns how many
    threads were changed."""
    import os

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

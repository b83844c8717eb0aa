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

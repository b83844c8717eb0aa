"""Refusing work that cannot fit in memory, before allocating it.

An out-of-memory failure in the middle of a run costs the user the run and
prints a traceback from deep inside numpy or TensorFlow; an estimate made up
front costs nothing and says which option to lower.
"""
from __future__ import annotations

from typing import Optional

from util.system import available_memory

from .errors import OptionError

GIB = 2 ** 30


def check(option: str, value: int, need: int, what: str, per_unit: int = 0) -> None:
    """OptionError(option) when ``need`` bytes (for ``what``) exceed the available memory.

    The message says how much is needed and available, and about the largest
    value of the option that would fit: available // ``per_unit`` (bytes per unit
    of the option), or, without ``per_unit``, as if ``need`` grew linearly with it.
    """
    have = available_memory()
    if have is None or need <= have:
        return
    fits = int(have // per_unit) if per_unit else int(value * have // need)
    advice = f"use a smaller --{option}" + (f" (at most about {fits})" if fits >= 1 else "")
    raise OptionError(option, f"{value} needs about {need / GIB:.1f} GiB for {what}, "
                              f"{have / GIB:.1f} GiB are available: {advice}")

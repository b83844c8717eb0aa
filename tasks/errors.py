"""The errors of the tasks layer that a user can cause (no heavy imports here)."""


class OptionError(ValueError):
    """An option of a task has a value it cannot take.

    ``option`` is the option's name as the Python API spells it (``top_k``,
    ``layer``, ...); the command-line tools report it as the flag
    (``--top_k ...``) and the server as the request field, so the rule lives
    here once, whatever front end passed the value.
    """

    def __init__(self, option: str, reason: str):
        super().__init__(f"{option} {reason}")
        self.option = option
        self.reason = reason


class DatasetError(Exception):
    """A dataset that cannot be used: missing, empty, unreadable, not in the .npz format."""

"""The one exception type of the model package (no TensorFlow import here)."""


class ModelError(Exception):
    """A problem with a model directory, checkpoint or its use that a user can fix.

    The message is always one readable line (it names the file or variable
    concerned), meant to be printed as-is on stderr by the command-line tools,
    which then exit with status 2.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

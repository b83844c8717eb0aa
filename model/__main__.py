"""python -m model: the model cache (see cli/download.py)."""
from cli.download import main
from cli.errors import run

if __name__ == "__main__":
    run(main, prog="python -m model")

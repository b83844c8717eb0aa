"""python -m encoder: encode and decode in pipelines (see cli/encoder.py)."""
from cli.encoder import main
from cli.errors import run

if __name__ == "__main__":
    run(main, prog="python -m encoder")

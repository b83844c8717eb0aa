"""gpt2-sweep.py's library: what sampling settings do to the text.

    from tasks.sweep import metrics            # pure functions over token id lists (no model)
    from tasks.sweep.grid import parse_axis, settings
    from tasks.sweep.run import Sweep, SweepConfig
    from tasks.sweep.report import write_report

``metrics`` needs numpy (and sacrebleu for Self-BLEU, mauve-text for MAUVE, imported when called);
``run`` loads the generation and scoring code; ``report`` needs matplotlib.  Nothing is imported here,
so ``import tasks.sweep.metrics`` stays light.
"""

"""What every command-line tool promises alike: --help without TensorFlow, one
line and exit status 2 for a user's error, and a quiet end when the reader of
its output goes away (``| head``)."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

#: Each tool as a user starts it, and a flag its --help must mention.
TOOLS = {
    "gpt2-generate.py": ([str(ROOT / "gpt2-generate.py")], "--num_generate"),
    "gpt2-transform.py": ([str(ROOT / "gpt2-transform.py")], "--pooling"),
    "gpt2-score.py": ([str(ROOT / "gpt2-score.py")], "--exclude-end"),
    "gpt2-encode.py": ([str(ROOT / "gpt2-encode.py")], "--src_dir"),
    "gpt2-finetune.py": ([str(ROOT / "gpt2-finetune.py")], "--base_model"),
    "gpt2-sweep.py": ([str(ROOT / "gpt2-sweep.py")], "--grid"),
    "python -m encoder": (["-m", "encoder"], "decode"),
    "python -m model": (["-m", "model"], "download"),
}
#: Bytes a pipe holds on Linux before its writer blocks.
PIPE_BUFFER = 65536


def _run(tool, args, env, stdin=None, timeout=180):
    command, _ = TOOLS[tool]
    return subprocess.run([sys.executable, *command, *args], input=stdin, capture_output=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_does_not_import_tensorflow(tool, env):
    command, flag = TOOLS[tool]
    if command[0] == "-m":
        start = "runpy.run_module(%r, run_name='__main__', alter_sys=True)" % command[1]
        argv = ["python -m " + command[1], "--help"]
    else:
        start = "runpy.run_path(%r, run_name='__main__')" % command[0]
        argv = [command[0], "--help"]
    code = ("import runpy, sys; sys.argv = %r\n"
            "try:\n    %s\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('TF' if 'tensorflow' in sys.modules else 'NO TF', file=sys.stderr)" % (argv, start))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert flag.encode() in p.stdout, p.stderr
    assert p.stderr.strip().endswith(b"NO TF"), p.stderr


# -- user errors: one line, status 2 ------------------------------------------------------------

#: (tool, arguments, text the error line holds, stdin).  {tiny} is the tiny
#: checkpoint, {npz} a small dataset, {tmp} a fresh directory.
ERRORS = [
    ("gpt2-generate.py", ["--model", "/nonexistent/model"], "does not exist", None),
    ("gpt2-generate.py", ["--num_generate", "0"], "must be at least 1", None),
    ("gpt2-generate.py", ["--batch_size", "0"], "must be at least 1", None),
    ("gpt2-generate.py", ["--top_p", "2"], "--top_p must be between 0 and 1", None),
    ("gpt2-generate.py", ["--max_length", "-3"], "must not be negative", None),
    ("gpt2-generate.py", ["--vocab", "/nonexistent/vocab"], "ja-bpe.txt", None),
    ("gpt2-generate.py", ["--min_length", "512"], "--min_length must be below n_ctx/2 = 512", None),
    ("gpt2-generate.py", ["--context", "-"], "not UTF-8", b"\xff\xfe"),
    ("gpt2-transform.py", ["--context", "x", "--layer", "5"], "--layer must be -1 (final) or 0..1", None),
    ("gpt2-transform.py", ["--context", "x", "--model", "/nonexistent"], "does not exist", None),
    ("gpt2-transform.py", ["--context", "x", "--pooling", "max"], "invalid choice", None),
    ("gpt2-transform.py", ["--input", "/nonexistent/file.txt"], "cannot read /nonexistent/file.txt", None),
    ("gpt2-score.py", ["/nonexistent/input.txt"], "cannot read /nonexistent/input.txt", b"x\n"),
    ("gpt2-score.py", ["--model", "/nonexistent/model", "-"], "does not exist", b"x\n"),
    ("gpt2-score.py", ["--vocab", "/nonexistent/vocab", "-"], "ja-bpe.txt", b"x\n"),
    ("gpt2-score.py", ["--stride", "0", "-"], "must be at least 1", b"x\n"),
    ("gpt2-score.py", ["--format", "xml", "-"], "invalid choice", b"x\n"),
    ("gpt2-score.py", [], "the following arguments are required: INPUT_FILE", b"x\n"),
    ("gpt2-encode.py", ["--src_dir", "{tmp}", "--dst_file", "{tmp}/out.npz"], "no .txt files", None),
    ("gpt2-finetune.py", ["--dataset", "{tmp}/nothing.npz"], "no such dataset", None),
    ("gpt2-finetune.py", ["--model", "{tmp}/missing", "--dataset", "{npz}"], "cannot load the base model", None),
    ("python -m encoder", ["decode"], "line 1: not a JSON array", b"[1,\n"),
    ("python -m model", ["download", "gpt2ja-huge"], "unknown model 'gpt2ja-huge'", None),
]


@pytest.fixture
def npz(tmp_path, enc):
    from tasks import dataset as D

    path = tmp_path / "data.npz"
    D.save_npz(path, [np.asarray(enc.encode("吾輩は猫である。") + [enc.eos_id], np.uint16)])
    return path


@pytest.mark.parametrize("tool,args,message,stdin", ERRORS,
                         ids=[f"{t}:{' '.join(a) or 'no-args'}" for t, a, _, _ in ERRORS])
def test_errors_are_one_line(tool, args, message, stdin, tiny_model_dir, npz, tmp_path, env):
    work = tmp_path / "work"
    work.mkdir()
    args = [a.format(tiny=tiny_model_dir, npz=npz, tmp=work) for a in args]
    if tool.startswith("gpt2-") and tool not in ("gpt2-encode.py",) and "--model" not in args:
        args = ["--model", str(tiny_model_dir), *args]
    if tool in ("gpt2-generate.py", "gpt2-transform.py", "gpt2-score.py", "gpt2-finetune.py"):
        args = ["--gpu", "-1", *args]
    p = _run(tool, args, env, stdin=stdin)
    err = p.stderr.decode("utf-8")
    assert p.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and err.startswith(f"{tool}: error:"), err


# -- a reader that goes away --------------------------------------------------------------------


def _pipelines(tiny_model_dir, corpus_lines, tmp_path):
    """(tool, arguments, stdin file) whose output is many times a pipe's buffer."""
    base = ["--model", str(tiny_model_dir), "--gpu", "-1"]
    long_contexts = tmp_path / "contexts.txt"  # each printed in full in every jsonl record
    long_contexts.write_text("".join(line * 100 + "\n" for line in corpus_lines[:200]), encoding="utf-8")
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(corpus_lines[:2000]) + "\n", encoding="utf-8")
    short = tmp_path / "short.txt"
    short.write_text("これはテストです。\n" * 200000, encoding="utf-8")
    return {
        "gpt2-generate.py": (base + ["--contexts", "-", "--num_generate", "1", "--max_length", "2",
                                     "--format", "jsonl", "--seed", "1"], long_contexts),
        "gpt2-transform.py": (base + ["--input", "-"], lines),
        "gpt2-score.py": (base + ["--tokens", "-"], lines),
        "python -m encoder": (["encode"], short),
    }


@pytest.mark.parametrize("tool", ["gpt2-generate.py", "gpt2-transform.py", "gpt2-score.py", "python -m encoder"])
def test_broken_pipe_is_quiet(tool, tiny_model_dir, corpus_lines, tmp_path, env):
    """The reader takes one line and closes the pipe while the tool still has
    far more to write than the pipe holds: the tool must end at once, with
    nothing on stderr and status 141 (as if killed by SIGPIPE)."""
    args, source = _pipelines(tiny_model_dir, corpus_lines, tmp_path)[tool]
    whole = _run(tool, args, env, stdin=source.read_bytes(), timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert len(whole.stdout) > 16 * PIPE_BUFFER, len(whole.stdout)
    command, _ = TOOLS[tool]
    with open(source, "rb") as stdin:
        p = subprocess.Popen([sys.executable, *command, *args], stdin=stdin, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=ROOT)
        first = p.stdout.readline()
        p.stdout.close()  # like `| head -1`
        err = p.stderr.read()
        p.wait(timeout=300)
    assert first == whole.stdout.split(b"\n", 1)[0] + b"\n"
    assert err == b""
    assert p.returncode == 141


# -- what a first user trips over ------------------------------------------------------------------


def test_every_flag_takes_both_spellings(tiny_model_dir, env):
    import cli.finetune
    import cli.generate
    import cli.score
    import cli.transform

    for module in (cli.generate, cli.transform, cli.score, cli.finetune):
        parser = module.parser()
        for action in parser._actions:  # every long flag, under both separators
            longs = [s for s in action.option_strings if s.startswith("--") and s != "--help"]
            for s in longs:
                body = s[2:]
                assert "--" + body.replace("_", "-") in longs and "--" + body.replace("-", "_") in longs, (module, s)
    a = cli.generate.parser().parse_args(["--num-generate", "3", "--no_download", "--top-k", "2"])
    assert (a.num_generate, a.no_download, a.top_k) == (3, True, 2)
    a = cli.score.parser().parse_args(["--exclude_end", "-"])
    assert a.exclude_end
    # --help shows the original spelling only
    help_text = cli.generate.parser().format_help()
    assert "--num_generate" in help_text and "--num-generate" not in help_text


def test_stream_alone_streams_one_sample(tiny_model_dir, env):
    args = ["--model", str(tiny_model_dir), "--gpu", "-1", "--context", "今日は", "--max_length", "30", "--seed", "2"]
    streamed = _run("gpt2-generate.py", args + ["--stream"], env)
    plain = _run("gpt2-generate.py", args + ["--num_generate", "1"], env)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == plain.stdout and plain.stdout.strip()


def test_finetune_defaults_to_the_originals_base_model():
    import cli.finetune

    assert cli.finetune.parser().parse_args(["--dataset", "x.npz"]).model == "gpt2ja-small"
    assert cli.finetune.parser().parse_args(["--dataset", "x.npz", "--base_model", "m"]).model == "m"

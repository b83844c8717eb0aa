"""python -m model export --format hf: the folder loads in Hugging Face transformers and matches.

The exported tiny checkpoint and tokenizer are loaded with the real libraries (transformers and
the CPU build of torch, requirements-hf.txt) and compared with this project's encoder, model and
greedy generation goldens; a checkpoint written by gpt2-finetune.py exports the same way.
"""
import ast
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, user_env

MODEL_CLI = [sys.executable, "-m", "model"]


def _run(args, env, cwd=ROOT, timeout=600):
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


# The export through the CLI, in a child that reports whether it imported torch or transformers.
_EXPORT_AND_REPORT = (
    "import runpy, sys, json\n"
    "sys.argv = ['python -m model', *json.loads(sys.argv[1])]\n"
    "try:\n"
    "    runpy.run_module('model', run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "else:\n"
    "    code = 0\n"
    "sys.stderr.write('IMPORTED:' + json.dumps(sorted(m for m in ('torch', 'transformers', 'safetensors') "
    "if m in sys.modules)) + '\\n')\n"
    "sys.exit(code)\n"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, vocab_dir):

    out = tmp_path_factory.mktemp("export") / "tiny-hf"
    env = user_env(GPT2JA_VOCAB=str(vocab_dir))
    r = _run([sys.executable, "-c", _EXPORT_AND_REPORT,
              json.dumps(["export", str(tiny_model_dir), str(out), "--format", "hf"])], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{out}\n"
    assert "IMPORTED:[]" in r.stderr, r.stderr  # neither torch nor transformers (nor safetensors)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(exported), trust_remote_code=True)


@pytest.fixture(scope="module")
def hf_model(exported):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(exported))
    m.eval()
    return m


def _golden_records(golden):
    with open(golden / "encode.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------- the folder

def test_the_folder_holds_what_transformers_reads(exported, tiny):
    files = {p.name for p in exported.iterdir()}
    assert files == {"config.json", "model.safetensors", "generation_config.json", "README.md",
                     "tokenizer_config.json", "special_tokens_map.json", "tokenization_gpt2ja.py",
                     "ja-bpe.txt", "emoji.json", "LICENSE-vocabulary"}
    config = json.loads((exported / "config.json").read_text(encoding="utf-8"))
    hp = tiny.hparams
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert (config["vocab_size"], config["n_positions"], config["n_embd"], config["n_layer"], config["n_head"]) == \
        (20573, 1024, hp.n_embd, hp.n_layer, hp.n_head)
    assert config["activation_function"] == "gelu_new" and config["bos_token_id"] == config["eos_token_id"] == 20572
    assert config["tie_word_embeddings"] is True
    gen = json.loads((exported / "generation_config.json").read_text(encoding="utf-8"))
    assert gen["do_sample"] is True and gen["top_k"] == 40 and gen["eos_token_id"] == 20572
    tok_config = json.loads((exported / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok_config["auto_map"]["AutoTokenizer"][0] == "tokenization_gpt2ja.GPT2JapaneseTokenizer"
    card = (exported / "README.md").read_text(encoding="utf-8")
    assert "trust_remote_code=True" in card and "python -m model export" in card and "MIT" in card
    assert (exported / "LICENSE-vocabulary").read_bytes() == (ROOT / "encoder" / "LICENSE").read_bytes()
    assert (exported / "tokenization_gpt2ja.py").read_bytes() == (ROOT / "model" / "hf_tokenizer.py").read_bytes()


def test_safetensors_hold_every_weight_under_transformers_names(exported, tiny):
    from safetensors.numpy import load_file

    from model import export

    tensors = load_file(str(exported / "model.safetensors"))
    ours = export.read_safetensors(exported / "model.safetensors")
    weights = {k: v.numpy() for k, v in tiny.checkpoint_tensors().items()}
    names = export.hf_names(tiny.hparams)
    assert set(tensors) == set(ours) == set(names.values())
    assert "lm_head.weight" not in tensors  # tied to transformer.wte.weight
    for ckpt, hf in names.items():
        expected = weights[ckpt]
        if expected.ndim == 3:  # [1, in, out] -> Conv1D's [in, out]
            expected = expected[0]
        np.testing.assert_array_equal(tensors[hf], expected, err_msg=hf)
        np.testing.assert_array_equal(ours[hf], expected, err_msg=hf)


# ---------------------------------------------------------------------------- the tokenizer

def test_tokenizer_ids_equal_the_encoders_on_every_golden_record(hf_tokenizer, enc, golden):
    for r in _golden_records(golden):
        ids = hf_tokenizer(r["text"])["input_ids"]
        assert ids == r["ids"] == enc.encode(r["text"]), r["text"]
        assert hf_tokenizer(r["text"], clean=True)["input_ids"] == r["clean_ids"], r["text"]
        assert hf_tokenizer.decode(ids) == r["decoded"] == enc.decode(ids), r["text"]


def test_tokenizer_round_trip_special_tokens_and_clean_at_load(hf_tokenizer, exported, enc):
    from transformers import AutoTokenizer

    text = "今日は 良い天気です。\n改行\tタブ😀<|endoftext|>次の文書 𠀾"
    ids = hf_tokenizer.encode(text)
    assert ids == enc.encode(text) and ids.count(20572) == 1  # one id for <|endoftext|>, nothing added
    assert hf_tokenizer.decode(ids) == enc.decode(ids) == text
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text.replace("<|endoftext|>", "")
    assert hf_tokenizer.eos_token_id == hf_tokenizer.bos_token_id == 20572 and len(hf_tokenizer) == 20573
    assert hf_tokenizer.pad_token is None  # as GPT-2's; docs/export.md: pad_token = eos_token to batch
    cleaning = AutoTokenizer.from_pretrained(str(exported), trust_remote_code=True, clean=True)
    mail = "連絡はabc@example.comまで、2023年4月1日に"
    assert cleaning.encode(mail) == enc.encode(mail, clean=True) != enc.encode(mail)


def test_tokenizer_saves_and_loads_again(hf_tokenizer, tmp_path, enc):
    from transformers import AutoTokenizer

    hf_tokenizer.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert again.encode("吾輩は猫である 😀") == enc.encode("吾輩は猫である 😀")


def test_the_tokenizer_file_reads_without_transformers():
    """The project's tools never import transformers: the encoder in the shipped file is plain Python."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from model.hf_tokenizer import JapaneseBPE\n"
            "b = JapaneseBPE.from_files('encoder/ja-bpe.txt', 'encoder/emoji.json')\n"
            "print(b.encode('今日は 晴れ😀'), b.decode(b.encode('今日は 晴れ😀')))\n")
    r = _run([sys.executable, "-c", code], None)
    assert r.returncode == 0, r.stderr
    import encoder

    e = encoder.load()
    assert r.stdout == f"{e.encode('今日は 晴れ😀')} 今日は 晴れ😀\n"


# ---------------------------------------------------------------------------- the model

def test_logits_match_the_project_model_on_the_golden_contexts(hf_model, tiny, golden):
    import torch

    g = np.load(golden / "tiny" / "logits.npz")
    i = 0
    while f"ids_{i}" in g:
        ids = g[f"ids_{i}"].astype(np.int64)
        ours = tiny.logits([ids.tolist()])[0]
        with torch.no_grad():
            theirs = hf_model(torch.from_numpy(ids)[None]).logits[0].numpy()
        assert theirs.shape == ours.shape
        assert np.abs(theirs - ours).max() < 1e-4, i
        assert np.abs(theirs[-1] - g[f"logits_last_{i}"]).max() < 1e-4, i
        i += 1
    assert i == 14


def test_greedy_generate_gives_the_text_of_gpt2_generate_top_k_1(hf_model, hf_tokenizer, golden):
    import torch

    checked = 0
    for line in (golden / "tiny" / "generate.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        args = dict(zip(r["args"][::2], r["args"][1::2]))
        if "--min_length" in args:
            continue
        context = args.get("--context", "<|endoftext|>")
        max_length = int(args["--max_length"])
        ids = torch.tensor([hf_tokenizer.encode(context)])
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_length + max_length // 4)
        new = out[0, ids.shape[1]:].tolist()
        if hf_tokenizer.eos_token_id in new:
            new = new[:new.index(hf_tokenizer.eos_token_id)]
        text = hf_tokenizer.decode(new)
        assert len(text) >= max_length or len(new) < len(out[0]) - ids.shape[1]  # enough tokens for the cut
        text = text[:max_length]
        expected = r["stdout"].split("\n========\n")[0].rstrip("\n")
        assert text == expected, context
        checked += 1
    assert checked == 7


def test_a_finetuned_checkpoint_exports_the_same_way(tiny_model_dir, tmp_path, corpus_lines, vocab_dir):

    import torch
    from transformers import AutoModelForCausalLM

    import model

    env = user_env(GPT2JA_VOCAB=str(vocab_dir))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("\n".join(corpus_lines[:120]), encoding="utf-8")
    r = _run([sys.executable, str(ROOT / "gpt2-finetune.py"), "--model", str(tiny_model_dir), "--dataset", str(src),
              "--run_name", "r", "--chunk", "64", "--batch_size", "2", "--max_steps", "2",
              "--learning_rate", "1e-2", "--seed", "1"], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "checkpoint" / "r"
    r = _run([*MODEL_CLI, "export", str(run), str(tmp_path / "hf")], env)
    assert r.returncode == 0, r.stderr
    tuned = model.load(run)
    base = model.load(tiny_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    ids = [20572, 100, 2000, 3000, 4000, 5]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    ours = tuned.logits([ids])[0]
    assert np.abs(theirs - ours).max() < 1e-4
    assert np.abs(base.logits([ids])[0] - ours).max() > 1e-3  # the export is of the fine-tuned weights


# ---------------------------------------------------------------------------- errors and layering

def test_export_errors_are_one_line(tmp_path, vocab_dir):

    env = user_env(GPT2JA_VOCAB=str(vocab_dir))
    r = _run([*MODEL_CLI, "export", str(tmp_path / "missing"), str(tmp_path / "out"), "--no-download"], env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _run([*MODEL_CLI, "export", str(ROOT / "tests" / "data" / "gpt2ja-tiny"), str(blocker)], env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a directory" in r.stderr, r.stderr
    r = _run([*MODEL_CLI, "export", "x", str(tmp_path / "o"), "--format", "gguf"], env)
    assert r.returncode == 2 and "gguf" in r.stderr


def test_no_module_of_the_tools_imports_torch_or_transformers():
    """Only the shipped tokenizer file names transformers (inside a try, for its base class)."""
    found = []
    for package in ("cli", "server", "tasks", "hub", "model", "encoder", "util"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n.split(".")[0] in ("torch", "transformers", "safetensors") for n in names):
                    found.append(str(path.relative_to(ROOT)))
    assert found == ["model/hf_tokenizer.py"]


def test_export_help_imports_neither_tensorflow_nor_torch():
    code = ("import runpy, sys; sys.argv = ['python -m model', 'export', '--help']\n"
            "try:\n    runpy.run_module('model', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code in (0, None)\n"
            "print(sorted(m for m in ('tensorflow', 'torch', 'transformers') if m in sys.modules), file=sys.stderr)")
    r = _run([sys.executable, "-c", code], None)
    assert "--format" in r.stdout and "trust_remote_code" in r.stdout
    assert r.stderr.strip().endswith("[]"), r.stderr

"""The repository keeps its promises about how it is tested and installed."""
import re

from conftest import ROOT


def _readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Testing", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if "pytest" in line]


def test_ci_runs_the_readme_test_command():
    (command,) = _readme_test_command()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert command in ci.splitlines()


def test_requirements_name_every_runtime_dependency():
    for name in ("requirements.txt", "requirements-cpu.txt"):
        reqs = (ROOT / name).read_text(encoding="utf-8")
        for dep in ("tensorflow", "numpy", "tqdm", "jaconv"):
            assert re.search(rf"^{dep}(-cpu)?>=", reqs, re.M), (name, dep)


def test_the_repository_holds_every_test_data_file():
    """The suite's precondition: every data file a test reads is in this
    repository (tracked by git when this is a clone), not beside it."""
    import hashlib
    import json
    import subprocess

    from conftest import DATA_FILES

    missing = [name for name in DATA_FILES if not (ROOT / name).is_file()]
    assert missing == []
    if (ROOT / ".git").exists():
        tracked = subprocess.run(["git", "ls-files", "--", *DATA_FILES], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.split()
        assert sorted(set(DATA_FILES) - set(tracked)) == []
    # the official vocabulary, byte for byte
    digests = {"ja-bpe.txt": "89d4732745dfb91282ca4202f8b64c0fc25f090399030ca246e8866ffcc3c9e4",
               "emoji.json": "9f317e0456bf67a5d6b07b306a44def1ab166dfcc83b79b335b26217be0a6169"}
    for name, digest in digests.items():
        assert hashlib.sha256((ROOT / "encoder" / name).read_bytes()).hexdigest() == digest, name
    # every golden record is there (a truncated file would make the golden tests pass on less)
    with open(ROOT / "tests" / "data" / "golden" / "encode.jsonl", encoding="utf-8") as f:
        assert sum(1 for line in f if json.loads(line)) == 3258
    contexts = (ROOT / "tests" / "data" / "golden" / "contexts.txt").read_text(encoding="utf-8").splitlines()
    assert len(contexts) == 14


def test_tests_read_nothing_outside_the_repository():
    """No test reaches for ../shared or another directory beside the clone."""
    outside = ("GPT2JA_SHARED", '"shared"', "ROOT.parent", "../shared")
    for path in (ROOT / "tests").glob("*.py"):
        if path.name == "test_repo.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert [word for word in outside if word in text] == [], path.name

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

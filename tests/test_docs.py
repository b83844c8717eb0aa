"""The documentation says what the code does: every tool's flag table in docs/ lists exactly the
flags its --help lists (with the same choices), and every relative link in README.md and docs/
leads to a file that exists.

A flag table is marked by a comment naming the tool (and sub-command) just above it:

    <!-- flags: gpt2-bulk.py generate -->
    | flag | default | meaning |
    | --- | --- | --- |
    | `--engine auto\\|numpy\\|tf\\|onnx` | `auto` | ... |

Each backquoted item of a row's first column names one flag (its first word) or a positional
argument (its metavar, such as `INPUT_FILE`); ``a|b|c`` after a flag lists its choices.  The
parsers are the tools' own builders (cli/*.py), which import no TensorFlow.
"""
import argparse
import re

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"


def _parsers():
    from cli import bulk, download, encode, encoder, finetune, generate, score, server, sweep, transform

    def subcommands(parser):
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return action.choices.items()

    out = {
        "gpt2-generate.py": generate.parser(),
        "gpt2-transform.py": transform.parser(),
        "gpt2-score.py": score.parser(),
        "gpt2-encode.py": encode.parser(),
        "gpt2-finetune.py": finetune.parser(),
        "gpt2-server.py": server.parser(),
        "gpt2-sweep.py": sweep.parser(),
    }
    # every sub-command, so that a new one (python -m model merge, ...) needs its table too
    for tool, parser in (("gpt2-bulk.py", bulk.parser()), ("python -m model", download._parser()),
                         ("python -m encoder", encoder._parser())):
        for name, sub in subcommands(parser):
            out[f"{tool} {name}"] = sub
    return out


PARSERS = _parsers()


def _help_flags(parser):
    """{name: choices or None} of what --help lists: a flag by its first spelling, a positional
    argument by its metavar; sub-command selectors and -h/--help left out."""
    out = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            name = action.option_strings[0]
        else:
            name = action.metavar or action.dest
            if action.choices and not action.metavar:
                name = action.dest.upper()
        out[name] = set(action.choices) if action.choices else None
    return out


def _doc_tables():
    """{tool: (file name, {flag: choices or None})} of every marked flag table in docs/."""
    tables = {}
    for path in sorted(DOCS.glob("*.md")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for k, line in enumerate(lines):
            m = re.fullmatch(r"\s*<!--\s*flags:\s*(.+?)\s*-->\s*", line)
            if not m:
                continue
            tool = m.group(1)
            assert tool not in tables, f"{tool}: a second flag table in {path.name} (the first is in {tables[tool][0]})"
            rows = []
            for row in lines[k + 1:]:
                if not row.startswith("|"):
                    break
                rows.append(row)
            assert len(rows) >= 2, f"{path.name}: no table right below <!-- flags: {tool} -->"
            flags = {}
            for row in rows[2:]:  # the header and the |---| line first
                first = re.split(r"(?<!\\)\|", row)[1]
                for item in re.findall(r"`([^`]+)`", first):
                    words = item.split()
                    name = words[0]
                    choices = None
                    if len(words) > 1 and "|" in words[1]:
                        choices = set(words[1].replace("\\|", "|").split("|"))
                    flags[name] = choices
            tables[tool] = (path.name, flags)
    return tables


TABLES = _doc_tables()


@pytest.mark.parametrize("tool", sorted(PARSERS))
def test_flag_table_lists_exactly_the_flags_of_help(tool):
    if not _help_flags(PARSERS[tool]) and tool not in TABLES:
        return  # (a sub-command without flags, such as python -m model list, needs no table)
    assert tool in TABLES, (f"{tool}: no flag table in docs/ (add one below a line '<!-- flags: {tool} -->'); "
                            f"its --help lists {', '.join(sorted(_help_flags(PARSERS[tool])))}")
    doc, table = TABLES[tool]
    problems = _problems(tool, _help_flags(PARSERS[tool]), doc, table)
    assert problems == [], "\n".join(problems)


def _problems(tool, helped, doc, table):
    """What a flag table gets wrong against --help, one line each, naming the flag and the file."""
    missing = sorted(set(helped) - set(table))
    extra = sorted(set(table) - set(helped))
    problems = [f"{flag} is in {tool} --help but missing from the flag table in docs/{doc}" for flag in missing]
    problems += [f"{flag} is in the flag table in docs/{doc} but not in {tool} --help" for flag in extra]
    for flag in sorted(set(helped) & set(table)):
        if helped[flag] is not None and table[flag] is not None and helped[flag] != table[flag]:
            problems.append(f"{flag} of {tool}: docs/{doc} lists the choices {'|'.join(sorted(table[flag]))}, "
                            f"--help {'|'.join(sorted(helped[flag]))}")
        elif helped[flag] is not None and table[flag] is None:
            problems.append(f"{flag} of {tool}: docs/{doc} does not list its choices "
                            f"({'|'.join(sorted(helped[flag]))}) after the flag")
    return problems


def test_a_stale_flag_table_is_reported_by_flag_and_file():
    """What the README's server table had wrong (no --quantize, --engine without onnx) is caught."""
    from cli import server

    helped = _help_flags(server.parser())
    stale = dict(TABLES["gpt2-server.py"][1])
    del stale["--quantize"]
    stale["--engine"] = {"auto", "numpy", "tf"}
    stale["--no_such_flag"] = None
    assert _problems("gpt2-server.py", helped, "server.md", stale) == [
        "--quantize is in gpt2-server.py --help but missing from the flag table in docs/server.md",
        "--no_such_flag is in the flag table in docs/server.md but not in gpt2-server.py --help",
        "--engine of gpt2-server.py: docs/server.md lists the choices auto|numpy|tf, --help auto|numpy|onnx|tf"]


def test_every_flag_table_names_a_tool():
    unknown = {tool: doc for tool, (doc, _) in TABLES.items() if tool not in PARSERS}
    assert unknown == {}, f"flag tables of tools this test does not know (add them to _parsers): {unknown}"


def _markdown_files():
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _relative_links(text):
    """Targets of [text](target) and ![alt](target) that are not absolute URLs (page anchors
    such as #flags included)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks and inline code hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        yield target


def _anchors(path):
    """GitHub's anchors of a markdown file's headings."""
    out = set()
    for line in re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def _broken_links(path, root=ROOT):
    broken = []
    for target in _relative_links(path.read_text(encoding="utf-8")):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{path.relative_to(root)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{path.relative_to(root)}: {target} (no heading #{anchor} in {dest.name})")
    return broken


def test_relative_links_resolve():
    broken = [b for path in _markdown_files() for b in _broken_links(path)]
    assert broken == [], "\n".join(broken)


def test_link_checker_finds_broken_links(tmp_path):
    """The link test can fail: it sees links and anchors, and skips URLs and code."""
    text = "[a](docs/x.md) ![b](docs/server.png) [c](https://example.com) `[d](e)`\n```\n[f](g.md)\n```\n[h](#top)"
    assert list(_relative_links(text)) == ["docs/x.md", "docs/server.png", "#top"]
    (tmp_path / "other.md").write_text("# Sentence vectors: `gpt2-transform.py`\n## Flags\n", encoding="utf-8")
    assert _anchors(tmp_path / "other.md") == {"sentence-vectors-gpt2-transformpy", "flags"}
    page = tmp_path / "page.md"
    page.write_text("# Top\n[ok](other.md#flags) [gone](missing.md) [bad](other.md#nothing) [here](#top) "
                    "[not here](#bottom)\n", encoding="utf-8")
    assert _broken_links(page, tmp_path) == ["page.md: missing.md (no such file)",
                                            "page.md: other.md#nothing (no heading #nothing in other.md)",
                                            "page.md: #bottom (no heading #bottom in page.md)"]


def test_docs_exist_for_every_tool():
    """README points at one page per tool; each exists and has a flag table of its tool."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in ("generate", "transform", "score", "encode", "server", "bulk", "models", "performance",
                 "architecture"):
        assert f"docs/{page}.md" in readme, page
        assert (DOCS / f"{page}.md").is_file(), page

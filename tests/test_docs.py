"""The user documentation stays true to the code: its commands parse, its code compiles, its links resolve."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from amft_vlm.cli import build_parser
from amft_vlm.compare import load_compare_config
from amft_vlm.run.config import load_config
from scripts.make_env_docs import DOCS, pages

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, ROOT / "BENCHMARKS.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def code_blocks(path: Path, language: str) -> list[str]:
    """The fenced code blocks of `path` marked as `language`."""
    return [body for marked, body in FENCE.findall(path.read_text()) if marked == language]


def commands(path: Path) -> list[list[str]]:
    """Every ``amft-vlm ...`` command in the bash blocks of `path`, as arguments (continuations joined, comments dropped)."""
    found = []
    for block in code_blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["amft-vlm"]:
                found.append(words[1:])
    return found


def test_environment_pages_are_generated_from_current_docstrings():
    for file_name, text in pages().items():
        assert (DOCS / file_name).read_text() == text, f"docs/{file_name} is stale: run python scripts/make_env_docs.py"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "#")):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page.name} links to {target}, which does not exist"


def test_every_docs_page_is_reachable_from_the_readme():
    linked = {(ROOT / target.split("#")[0]).resolve() for target in LINK.findall(README.read_text())}
    for page in DOCS.glob("*.md"):
        linked_from_a_page = any(f"]({page.name}" in other.read_text() for other in DOCS.glob("*.md") if other != page)
        assert page.resolve() in linked or linked_from_a_page, f"docs/{page.name} is linked from nowhere"


def test_the_readme_keeps_the_two_commands():
    block = code_blocks(README, "bash")[0]
    assert [line.split("#")[0].strip() for line in block.splitlines()] == ["make demo", "make test"]


def test_the_readmes_commands_parse_and_their_training_configs_load():
    parser = build_parser()
    found = commands(README)
    assert {words[0] for words in found} >= {"train", "eval", "report", "compare"}
    for words in found:
        args = parser.parse_args(words)
        if args.command == "train" and args.config:
            load_config(ROOT / args.config, args.overrides)  # validates every override against the config
        if args.command == "compare":
            load_compare_config(ROOT / args.config, args.overrides)


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda page: page.name)
def test_the_docs_commands_parse(page):
    parser = build_parser()
    for words in commands(page):
        if "--help" in words or any(word.startswith("[") for word in words):  # --help exits; [--option VALUE] is a synopsis
            continue
        parser.parse_args(words)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_python_blocks_compile(page):
    for block in code_blocks(page, "python"):
        compile(block, str(page), "exec")


def test_the_readmes_smoke_table_is_the_shipped_configs_output():
    """The compare table in the README must come from the shipped smoke config: its rows are the config's methods,
    its footnote the config's steps, seeds and evaluation episodes (rerun the grid when the config changes)."""
    readme = README.read_text()
    start = readme.index("```\n| method |") + 4  # the printed table, in a code block
    table = readme[start : readme.index("```", start)]
    tiny = load_compare_config()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == tiny.compare.methods  # rows[0] is the header
    assert f"final checkpoint (step {tiny.train.steps}), greedy, {tiny.compare.eval_episodes} episodes per setting" in table
    assert f"mean over {len(tiny.compare.seeds)} seeds" in table


def test_cli_help_works():
    result = subprocess.run([sys.executable, "-m", "amft_vlm.cli", "--help"], capture_output=True, text=True, check=True)
    assert "play" in result.stdout

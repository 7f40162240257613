"""The user documentation stays true to the code."""

import subprocess
import sys
from pathlib import Path

from scripts.make_env_docs import DOCS, pages

ROOT = Path(__file__).resolve().parent.parent


def test_environment_pages_are_generated_from_current_docstrings():
    for file_name, text in pages().items():
        assert (DOCS / file_name).read_text() == text, f"docs/{file_name} is stale: run python scripts/make_env_docs.py"


def test_readme_links_exist():
    readme = (ROOT / "README.md").read_text()
    for page in pages():
        assert f"docs/{page}" in readme


def test_cli_help_works():
    result = subprocess.run([sys.executable, "-m", "amft_vlm.cli", "--help"], capture_output=True, text=True, check=True)
    assert "play" in result.stdout

"""Every YAML amft-vlm reads is bounded: a "billion laughs" document is refused at once, wherever it is read.

The document is a few hundred bytes of anchors whose aliases of aliases stand for 9**9 strings. PyYAML builds
them shared, so reading it is cheap; what expands them is the first walk over the values (writing
``config.yaml``, comparing a resumed run's settings), which grows without bound. Each entry point must refuse
it before that, in well under a second and without allocating more than a few MiB.
"""

import contextlib
import logging
import signal
import time
import tracemalloc

import pytest

from amft_vlm.compare.config import load_compare_config
from amft_vlm.demo import load_demo_config
from amft_vlm.evaluation.report import load_run
from amft_vlm.learning.resume import check_resume_settings
from amft_vlm.run.config import config_to_dict, load_config, parse_yaml

LEVELS = 9
REFUSED = "once its aliases are expanded"


def billion_laughs(indent: str = "") -> str:
    """Anchors l0..l8, each a list of nine aliases of the one before: l8 stands for 9**9 strings."""
    lines = [f"{indent}l0: &l0 [lol]"]
    lines += [f"{indent}l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 9)}]" for level in range(1, LEVELS)]
    return "\n".join(lines) + "\n"


def billion_laughs_flow() -> str:
    """The same anchors as one flow mapping, for a ``key=value`` override."""
    return "{" + ", ".join(billion_laughs().strip().splitlines()) + "}"


def merge_chain(levels: int = 40) -> str:
    """Merge keys whose merged pairs double at each level: PyYAML would build a list of 2**40 of them."""
    merges = "".join(f"  m{level}: &m{level} {{<<: [*m{level - 1}, *m{level - 1}]}}\n" for level in range(1, levels))
    return "env_kwargs:\n  m0: &m0 {x: 1}\n" + merges


PLACEMENTS = {
    "under env_kwargs": lambda: "env_kwargs:\n" + billion_laughs(indent="  "),
    "at the top level": billion_laughs,
}


@contextlib.contextmanager
def refused_quickly(seconds: float = 1.0, most_bytes: int = 8 * 2**20):
    """Fail unless the block ends within `seconds` (interrupting it if not) allocating at most `most_bytes`."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the document is being expanded")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert elapsed < seconds and peak < most_bytes, (elapsed, peak)


def _run_dir(tmp_path, config_text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    (run / "config.yaml").write_text(config_text)
    return run


ENTRY_POINTS = {
    "train --config": lambda path: config_to_dict(load_config(path)),
    "compare --config": lambda path: load_compare_config(path),
    "demo --config": lambda path: load_demo_config(path),
    "report (the run's config.yaml)": lambda path: load_run(_run_dir(path.parent, path.read_text())),
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_a_billion_laughs_file_is_refused_at_once(tmp_path, entry_point, placement):
    path = tmp_path / "laughs.yaml"
    path.write_text(PLACEMENTS[placement]())
    assert len(path.read_bytes()) < 700
    with refused_quickly(), pytest.raises(ValueError, match=rf"\.yaml, line \d+, column \d+: refused \(.*{REFUSED}"):
        ENTRY_POINTS[entry_point](path)


def test_a_billion_laughs_override_is_refused_at_once():
    with refused_quickly(), pytest.raises(ValueError, match=rf"the value of 'env_kwargs' is refused \(.*{REFUSED}"):
        config_to_dict(load_config(overrides=[f"env_kwargs={billion_laughs_flow()}"]))


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_a_resumed_run_does_not_expand_a_billion_laughs_run_config(tmp_path, caplog, placement):
    saved = tmp_path / "config.yaml"
    saved.write_text(PLACEMENTS[placement]())
    caplog.set_level(logging.WARNING, logger="amft_vlm.learning.checkpoint")
    config = load_config()
    with refused_quickly():
        check_resume_settings(config, saved, 0)
    assert any(REFUSED in record.getMessage() and "not compared" in record.getMessage() for record in caplog.records)


def test_aliases_and_merge_keys_within_the_limit_still_work(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text("env_kwargs: &language {modality: language, num_cards: 4}\nvalidation_env_kwargs: *language\n")
    config = load_config(path)
    assert config.env_kwargs == config.validation_env_kwargs == {"modality": "language", "num_cards": 4}
    assert parse_yaml("base: &base {a: 1, b: 2}\nmerged: {<<: *base, b: 3}\n")["merged"] == {"a": 1, "b": 3}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("env_kwargs: &loop [*loop]\n", "an alias refers to a value that contains it"),
        ("env_kwargs: " + "[" * 500_000 + "\n", "more than 64 levels deep"),
        ("env_kwargs:\n" + "".join(" " * level + f"k{level}:\n" for level in range(1, 1000)), "more than 64 levels deep"),
        (merge_chain(), REFUSED),
    ],
    ids=["recursive", "deep-brackets", "deep-indentation", "merge-keys"],
)
def test_recursive_deep_and_multiplying_merge_documents_are_refused(tmp_path, text, problem):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with refused_quickly(seconds=5.0), pytest.raises(ValueError, match=rf"hostile.yaml.*: refused \(.*{problem}"):
        load_config(path)


def test_a_file_longer_than_the_limit_is_refused_without_reading_it_whole(tmp_path):
    from amft_vlm.run.config import MAX_YAML_LENGTH

    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * (4 * MAX_YAML_LENGTH) + "\n")
    with refused_quickly(most_bytes=2 * MAX_YAML_LENGTH + 2**20), pytest.raises(ValueError, match=r"huge.yaml is longer than"):
        load_config(path)
    with pytest.raises(ValueError, match=r"characters long, more than"):
        load_config(overrides=["env_id=" + "x" * (MAX_YAML_LENGTH + 1)])

"""The key-value cache code that builds on transformers internals: the version it is tested against,
and the preallocated layer behaving as the ``DynamicLayer`` it replaces."""

from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from transformers.cache_utils import DynamicLayer

from agents.policy.kv_cache import _PreallocatedLayer

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_installed_transformers_is_in_the_range_pyproject_declares():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (requirement,) = [Requirement(line) for line in dependencies if Requirement(line).name == "transformers"]
    assert requirement.specifier.contains(transformers.__version__, prereleases=True), (
        f"transformers {transformers.__version__} is outside {requirement.specifier}, the range "
        "agents/policy/kv_cache.py is tested against: run tests/agents, then move the range in pyproject.toml"
    )
    # An upper bound: a new transformers minor may change the cache internals kv_cache.py subclasses.
    assert any(spec.operator == "<" for spec in requirement.specifier)


def test_preallocated_layer_matches_dynamic_layer():
    generator = torch.Generator().manual_seed(0)
    preallocated, dynamic = _PreallocatedLayer(capacity=9), DynamicLayer()
    for step_length in (4, 1, 1):
        keys = torch.randn(3, 2, step_length, 5, generator=generator)
        values = torch.randn(3, 2, step_length, 5, generator=generator)
        for got, want in zip(preallocated.update(keys, values), dynamic.update(keys, values), strict=True):
            assert torch.equal(got, want)
    assert preallocated.get_seq_length() == dynamic.get_seq_length() == 6
    index = torch.tensor([2, 0])
    preallocated.batch_select_indices(index)
    dynamic.batch_select_indices(index)
    keys, values = torch.randn(2, 2, 1, 5, generator=generator), torch.randn(2, 2, 1, 5, generator=generator)
    for got, want in zip(preallocated.update(keys, values), dynamic.update(keys, values), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="cannot take position"):
        preallocated.update(torch.zeros(2, 2, 3, 5), torch.zeros(2, 2, 3, 5))

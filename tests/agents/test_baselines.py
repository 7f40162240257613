"""The model-free agents by name, as the command line and the demo build them."""

import pytest

from agents.baselines import BASELINE_AGENTS, ExpertAgent, baseline_agent


def test_baseline_agent_builds_each_named_agent_with_its_seed():
    for name, agent_class in BASELINE_AGENTS.items():
        assert isinstance(baseline_agent(name, seed=3), agent_class)
        assert baseline_agent(name).name == name
    assert isinstance(baseline_agent("expert", seed=3), ExpertAgent)
    same = [baseline_agent("random", seed=7).act({}, None) for _ in range(2)]
    assert same[0] == same[1]  # a new agent per call, seeded alike
    assert baseline_agent("random", seed=8).act({}, None) != same[0]


def test_baseline_agent_names_the_choices_for_an_unknown_name():
    with pytest.raises(ValueError, match=r"unknown agent 'oracle'; choose one of \['expert', 'format-only', 'random'\]"):
        baseline_agent("oracle")

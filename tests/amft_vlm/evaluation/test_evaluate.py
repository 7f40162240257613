"""Evaluation: sanity rows (expert 100%, random 0%) on every setting, the metrics, records, the CLI, and the
agents' records of the per-episode loop the rollout engine replaced."""

import dataclasses
import json
import math

import pytest

from agents.baselines import ExpertAgent, GeneralPointsFormatAgent, RandomTextAgent
from amft_vlm.cli import main
from amft_vlm.evaluation import evaluate as evaluation
from amft_vlm.evaluation.evaluate import comparison_table, evaluate, load_record, paper_setting, write_record
from amft_vlm.evaluation.served import EpisodeUsage, RetryPolicy, ServedInfo
from amft_vlm.rollout.episode_metrics import EpisodeOutcome, Metric, compute_metrics
from tests.amft_vlm.model_free import AGENTS, ORACLE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = {"GeneralPoints-v0": 12, "VIRL-v0": 4}
"""Episodes per test evaluation: enough to see 100% and 0%, few enough to stay fast."""

CHEAP_IMAGES = {"resolution": 64}

ALL_SETTINGS = [
    (env_id, setting, modality)
    for env_id in ("GeneralPoints-v0", "VIRL-v0")
    for modality in ("language", "vision")
    for setting in ("id", "ood-rule", "ood-visual")
    if not (setting == "ood-visual" and modality == "language")
]


def _evaluate_agent(agent, env_id, setting, modality, **kwargs):
    return evaluate(
        env_id=env_id,
        setting=setting,
        modality=modality,
        episodes=SMALL[env_id],
        agent=agent,
        env_kwargs=CHEAP_IMAGES if modality == "vision" else None,
        progress=False,
        **kwargs,
    )


def _assert_shares_sum_to_one(record):
    assert math.isclose(sum(metric.value for metric in record.verdict_shares.values()), 1.0)


def _episode(seed, verdicts, success):
    """A hand-made outcome whose answers earn +1 when correct and -1 otherwise."""
    return EpisodeOutcome(seed, verdicts, tuple(1.0 if verdict == "correct" else -1.0 for verdict in verdicts), success)


@pytest.mark.parametrize(("env_id", "setting", "modality"), ALL_SETTINGS)
def test_expert_solves_everything_and_random_nothing(env_id, setting, modality):
    expert = _evaluate_agent(ExpertAgent(), env_id, setting, modality)
    random = _evaluate_agent(RandomTextAgent(seed=0), env_id, setting, modality)
    name, _ = paper_setting(env_id, setting, modality)
    assert expert.setting == random.setting == name
    assert expert.episodes == random.episodes == SMALL[env_id]
    for key, metric in expert.metrics.items():
        if key not in ("mean_turns", "mean_return"):
            assert (metric.value, metric.stderr) == (1.0, 0.0), key
    assert expert.verdict_shares["correct"].value == 1.0
    assert random.metrics["success_rate"].value == random.metrics["first_attempt_success"].value == 0.0
    assert random.verdict_shares["correct"].value == 0.0
    has_recognition = env_id == "GeneralPoints-v0" and modality == "vision"
    assert ("recognition_accuracy" in expert.metrics) == has_recognition
    assert ("step_accuracy" in expert.metrics) == (env_id == "VIRL-v0")
    assert ("valid_formula_rate" in expert.metrics) == (env_id == "GeneralPoints-v0")
    assert "retry_success" not in expert.metrics  # no episode had a failed answer to recover from
    assert random.metrics["retry_success"] == Metric.proportion(0, SMALL[env_id])
    if env_id == "GeneralPoints-v0":
        assert expert.metrics["mean_turns"].value == 1.0
        assert expert.metrics["mean_return"] == Metric(5.0, 0.0, SMALL[env_id])  # one correct answer, +5
        assert random.metrics["mean_turns"].value == 6.0  # 5 verified attempts and the unread 6th
    else:
        assert random.metrics["step_accuracy"].value == 0.0
    for record in (expert, random):
        _assert_shares_sum_to_one(record)


def test_standard_errors():
    quarter = Metric.proportion(25, 100)
    assert quarter.value == 0.25
    assert quarter.stderr == pytest.approx(0.0433, abs=5e-5)
    assert Metric.proportion(0, 7).stderr == Metric.proportion(7, 7).stderr == 0.0
    turns = Metric.mean([1, 2, 3, 6])
    assert turns.value == 3.0
    assert turns.stderr == pytest.approx(math.sqrt(14 / 3 / 4))
    with pytest.raises(ValueError, match="at least one"):
        Metric.proportion(0, 0)


def test_metrics_of_hand_made_episodes():
    outcomes = [
        _episode(0, ("correct",), True),
        _episode(1, ("wrong_cards", "wrong_numbers", "correct"), True),
        _episode(2, ("wrong_cards",) * 5 + ("out_of_attempts",), False),
        _episode(3, ("missing_formula",) * 5 + ("out_of_attempts",), False),
    ]
    metrics, shares = compute_metrics(outcomes, "GeneralPoints-v0", "vision")
    assert metrics["mean_return"] == Metric.mean([1.0, -1.0, -6.0, -6.0])
    assert (metrics["mean_return"].value, metrics["mean_return"].stderr) == (-3.0, pytest.approx(math.sqrt(38 / 3 / 4)))
    assert metrics["success_rate"].value == 0.5
    assert metrics["success_rate"].stderr == pytest.approx(math.sqrt(0.25 / 4))
    assert metrics["first_attempt_success"].value == 0.25
    # 14 verified answers (the two unread 6th answers are not), 6 with wrong cards.
    assert metrics["recognition_accuracy"] == Metric.proportion(8, 14)
    assert metrics["mean_turns"].value == 4.0
    # Episodes 1, 2 and 3 had a failed answer; episode 1 recovered.
    assert metrics["retry_success"] == Metric.proportion(1, 3)
    # Wrong-cards answers are not counted: correct, wrong_numbers, correct of 3 + 5 missing formulas.
    assert metrics["valid_formula_rate"] == Metric.proportion(3, 8)
    assert shares["wrong_cards"] == Metric.proportion(6, 16)
    assert shares["out_of_attempts"] == Metric.proportion(2, 16)
    assert math.isclose(sum(metric.value for metric in shares.values()), 1.0)


def test_retry_success_and_valid_formula_rate():
    outcomes = [
        _episode(0, ("correct",), True),
        _episode(1, ("grammar_error", "wrong_numbers", "correct"), True),
        _episode(
            2, ("missing_formula", "illegal_formula", "no_solution", "partial", "wrong_numbers", "out_of_attempts"), False
        ),
    ]
    metrics, _ = compute_metrics(outcomes, "GeneralPoints-v0", "language")
    retried = metrics["retry_success"]
    assert (retried.value, retried.count) == (0.5, 2)
    assert retried.stderr == pytest.approx(0.5 / math.sqrt(2))
    # 9 verified answers; valid: correct x2, wrong_numbers x2, no_solution, partial.
    assert metrics["valid_formula_rate"] == Metric.proportion(6, 9)
    assert metrics["valid_formula_rate"].value == pytest.approx(2 / 3)
    assert "recognition_accuracy" not in metrics
    # Solved = solved first try + recovered after a failed first answer.
    n = len(outcomes)
    recovered = metrics["retry_success"].value * metrics["retry_success"].count
    assert metrics["success_rate"].value * n == pytest.approx(metrics["first_attempt_success"].value * n + recovered)


def test_conditional_metrics_are_absent_without_items():
    solved, _ = compute_metrics([_episode(seed, ("correct",), True) for seed in range(3)], "GeneralPoints-v0", "language")
    assert "retry_success" not in solved
    assert solved["valid_formula_rate"] == Metric.proportion(3, 3)
    blind = [_episode(0, ("wrong_cards",) * 5 + ("out_of_attempts",), False)]
    metrics, _ = compute_metrics(blind, "GeneralPoints-v0", "vision")
    assert "valid_formula_rate" not in metrics  # no answer's formula was checked
    assert metrics["retry_success"] == Metric.proportion(0, 1)
    assert metrics["recognition_accuracy"] == Metric.proportion(0, 5)


def test_virl_retry_success():
    outcomes = [
        _episode(0, ("correct", "correct", "correct"), True),
        _episode(1, ("wrong_action", "correct", "correct"), True),
        _episode(2, ("correct", "no_action", "wrong_observation", "out_of_attempts"), False),
        _episode(3, ("correct", "correct", "wrong_action", "correct"), True),
    ]
    metrics, _ = compute_metrics(outcomes, "VIRL-v0", "language")
    # Episodes 1, 2 and 3 failed an attempt somewhere; 1 and 3 still reached the destination.
    assert metrics["retry_success"] == Metric.proportion(2, 3)
    assert metrics["first_attempt_success"] == Metric.proportion(1, 4)
    assert metrics["step_accuracy"] == Metric.proportion(9, 13)  # 14 answers, the unread one not verified
    assert "valid_formula_rate" not in metrics


def test_verdict_shares_of_a_mixed_agent_sum_to_one():
    record = _evaluate_agent(GeneralPointsFormatAgent(seed=0), "GeneralPoints-v0", "id", "language")
    assert sum(metric.value > 0 for metric in record.verdict_shares.values()) >= 2
    _assert_shares_sum_to_one(record)


def test_record_round_trips_and_tables(tmp_path):
    first = _evaluate_agent(ExpertAgent(), "GeneralPoints-v0", "id", "language", split="test", seed=5)
    second = _evaluate_agent(RandomTextAgent(seed=0), "VIRL-v0", "ood-rule", "language")
    path = tmp_path / "expert.json"
    write_record(first, path)
    assert not list(tmp_path.glob("*.tmp"))
    loaded = load_record(path)
    assert loaded == first
    data = json.loads(path.read_text())
    assert data["seeds"] == list(range(5, 5 + SMALL["GeneralPoints-v0"]))
    assert data["split"] == "test" and data["env_kwargs"]["split"] == "test"
    assert data["metrics"]["success_rate"] == {"value": 1.0, "stderr": 0.0, "count": SMALL["GeneralPoints-v0"]}
    assert data["metrics"]["valid_formula_rate"] == {"value": 1.0, "stderr": 0.0, "count": SMALL["GeneralPoints-v0"]}
    assert "retry_success" not in data["metrics"]
    second_path = tmp_path / "random.json"
    write_record(second, second_path)
    assert load_record(second_path) == second
    assert load_record(second_path).metrics["retry_success"] == Metric.proportion(0, SMALL["VIRL-v0"])
    assert set(data["versions"]) == {"python", "amft-vlm", "torch", "transformers", "gymnasium"}
    table = comparison_table([loaded, second, first])
    rows = table.splitlines()[2:]
    assert len(rows) == 3
    assert "| retry success |" in table.splitlines()[0] and "| valid formula |" in table.splitlines()[0]
    assert "GP-L id" in rows[0] and "V-IRL-L ood-rule" in rows[1]
    wide = comparison_table([first, second], verdict_shares=True)
    assert "wrong_action share" in wide.splitlines()[0] and len(wide.splitlines()) == 4
    assert first.to_markdown().startswith(comparison_table([first]))
    path.write_text("{}")
    with pytest.raises(ValueError, match="format_version"):
        load_record(path)


def _as_served(record, served):
    """`record` as if a served model had played it, with the ``served`` entry `served`."""
    decoding = {"greedy": True, "temperature": None, "sampling_seed": None, "max_new_tokens": 256, "extra_body": {}}
    return dataclasses.replace(record, model="served-model", model_kind="served", decoding=decoding, served=served)


def test_served_records_round_trip_and_older_ones_read(tmp_path):
    agent = _evaluate_agent(ExpertAgent(), "GeneralPoints-v0", "id", "language")
    usage = [EpisodeUsage(seed, answers=1, prompt_tokens=10, completion_tokens=2) for seed in agent.seeds[:-1]]
    usage.append(EpisodeUsage(agent.seeds[-1], transport_failure="no completion after 6 attempts; the last: HTTP 500: internal error"))
    served = ServedInfo(
        api_base="http://***@127.0.0.1:8000/v1", api_key_env="OPENAI_API_KEY", concurrency=4, request_timeout=120.0,
        retry=RetryPolicy(), cache_dir="/cache", min_pixels=3136, max_pixels=12845056, server_identity={"id": "m", "owned_by": "vllm"},
        requests_sent=17, retries=6, faults={"HTTP 500": 6}, transport_failures=1, prompt_tokens=110, completion_tokens=22,
        episode_usage=tuple(usage),
    )
    record = _as_served(agent, served)
    path = tmp_path / "served.json"
    write_record(record, path)
    assert load_record(path) == record
    data = json.loads(path.read_text())
    assert data["served"]["retry"] == {"max_attempts": 6, "base_delay": 1.0, "max_delay": 60.0, "max_retry_after": 120.0}
    assert data["served"]["episode_usage"][0] == {
        "seed": 0, "answers": 1, "from_cache": 0, "prompt_tokens": 10, "completion_tokens": 2, "replayed_prompt_tokens": 0,
        "replayed_completion_tokens": 0, "truncated_answers": 0, "invalid_usage": 0, "neutralised_answers": 0,
        "transport_failure": None, "server_error": None,
    }
    text = record.to_markdown()
    assert f"| 1/{record.episodes} | 110 + 22 |" in text and "1 x no completion after 6 attempts" in text
    # A record written with fewer fields reads the missing ones as unknown (None) or 0.
    data["served"] = {"api_base": "http://h/v1", "requests_sent": 3, "unknown_field": True}
    path.write_text(json.dumps(data))
    older = load_record(path)
    assert older.served == ServedInfo(api_base="http://h/v1", requests_sent=3)
    assert "Served by http://h/v1: 3 requests sent, 0 retries" in older.to_markdown()
    assert f"| 0/{record.episodes} | 0 + 0 |" in comparison_table([older, agent])


@pytest.mark.parametrize(
    ("served", "message"),
    [
        ("hand-edited", "'served' must be an object (the endpoint and what the run did), or absent; got 'hand-edited'"),
        ({"requests_sent": 3}, "served.api_base must be the endpoint's URL; got None"),
        ({"api_base": "http://h/v1", "requests_sent": "many"}, "served.requests_sent must be a whole number; got 'many'"),
        ({"api_base": "http://h/v1", "episode_usage": [{"answers": 1}]}, "served.episode_usage entries need their episode's seed"),
        ({"api_base": "http://h/v1", "episode_usage": [{"seed": 0, "answers": 1.5}]}, "served.episode_usage[].answers must be a whole number"),
        ({"api_base": "http://h/v1", "retry": {"max_attempts": 0}}, "served.retry must be a retry policy object or null"),
    ],
)
def test_report_names_a_malformed_served_entry(served, message, tmp_path, capsys):
    """A hand-edited record whose ``served`` entry is not what a served evaluation writes stops ``report`` with one line
    naming the file and the field, before anything is written."""
    data = _evaluate_agent(ExpertAgent(), "GeneralPoints-v0", "id", "language").to_dict()
    data.update(model_kind="served", served=served)
    path = tmp_path / "served.json"
    path.write_text(json.dumps(data))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "mu": 1.0, "loss": 1.0}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run), "--out", str(tmp_path / "report"), "--eval", str(path)])
    assert exit_info.value.code == 2
    assert f"amft-vlm report: error: {path}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_paper_defaults():
    assert evaluation.SPLITS == ("train", "val", "test", "all")
    assert paper_setting("GeneralPoints-v0", "ood-visual", "vision")[0] == "GP-VL ood-visual"
    assert evaluation.BENCHMARKS["GeneralPoints-v0"].paper_episodes == {"id": 234, "ood-rule": 234, "ood-visual": 234}
    assert evaluation.BENCHMARKS["VIRL-v0"].paper_episodes == {"id": 48, "ood-rule": 48, "ood-visual": 18}


def test_eval_command_line(tmp_path, capsys):
    out = tmp_path / "random.json"
    assert main(["eval", "--agent", "random", "--episodes", "3", "--seed", "2", "--out", str(out)]) == 0
    assert "| random | GP-L id | all | agent | 3 |" in capsys.readouterr().out
    assert load_record(out).seeds == (2, 3, 4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--agent", "expert", "--setting", "ood-visual"], "needs modality vision"),
        (["--agent", "expert", "--episodes", "0"], "at least 1"),
        (["--agent", "expert", "--env-arg", "modality=vision"], "set by the setting"),
        (["--agent", "expert", "--temperature", "0.7"], "temperature applies to a model"),
        (["--agent", "expert", "--model", "tiny:qwen2-vl"], "not allowed with"),
        (["--episodes", "3"], "one of the arguments --model --agent is required"),
        (["--model", "tiny:llama"], "model: a tiny model spec is tiny:qwen2-vl or tiny:qwen2.5-vl"),
        (["--agent", "expert", "--out", "/nonexistent-dir/record.json"], "does not exist"),
    ],
)
def test_eval_command_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_split_is_refused_by_an_environment_without_one(monkeypatch, capsys):
    arguments = evaluation.environment_arguments
    monkeypatch.setattr(evaluation, "environment_arguments", lambda env_id: {k: v for k, v in arguments(env_id).items() if k != "split"})
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--agent", "expert", "--env", "VIRL-v0", "--split", "test", "--episodes", "1"])
    assert exit_info.value.code == 2
    assert "has no split argument" in capsys.readouterr().err


def test_tiny_model_through_the_rollout_engine(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    argv = ["eval", "--model", "tiny:qwen2-vl", "--episodes", "4", "--max-new-tokens", "8", "--num-envs", "4"]
    assert main([*argv, "--device", "cpu", "--out", str(out)]) == 0
    record = load_record(out)
    assert (record.model, record.model_kind, record.episodes) == ("tiny:qwen2-vl", "model", 4)
    assert record.decoding == {
        "greedy": True, "temperature": None, "sampling_seed": None, "max_new_tokens": 8, "num_envs": 4, "dtype": "float32", "device": "cpu",
    }
    # Random weights and 8 tokens cannot solve a hand: every episode spends all 6 answers.
    assert record.metrics["success_rate"].value == 0.0
    assert record.metrics["mean_turns"].value == 6.0
    _assert_shares_sum_to_one(record)
    assert "| tiny:qwen2-vl | GP-L id | all | greedy | 4 |" in capsys.readouterr().out


def test_metrics_of_an_environment_without_its_own():
    outcomes = [EpisodeOutcome(0, ("", ""), (0.25, 0.5), False), EpisodeOutcome(1, ("",), (1.0,), True)]
    metrics, shares = compute_metrics(outcomes)
    assert list(metrics) == ["success_rate", "first_attempt_success", "retry_success", "mean_turns", "mean_return"]
    assert metrics["mean_return"].value == 0.875 and metrics["mean_turns"].value == 1.5
    assert shares == {"": Metric.proportion(3, 3)}
    with pytest.raises(ValueError, match="one verdict per reward"):
        EpisodeOutcome(0, ("correct",), (), True)
    with pytest.raises(ValueError, match="no episodes"):
        compute_metrics([])


@pytest.mark.parametrize("case", ORACLE["evaluations"], ids=lambda case: "-".join(map(str, case["args"][:4])))
def test_agent_evaluations_reproduce_the_records_of_the_replaced_loop(case):
    env_id, setting, modality, agent, seed, episodes = case["args"]
    record = evaluate(
        env_id=env_id, setting=setting, modality=modality, episodes=episodes, seed=seed, agent=AGENTS[agent](),
        env_kwargs={"resolution": 64} if modality == "vision" else None, progress=False,
    ).to_dict()
    expected = case["record"]
    assert {key: record[key] for key in expected if key != "metrics"} == {key: value for key, value in expected.items() if key != "metrics"}
    # The same metrics, and the mean return the records did not have yet.
    assert {name: value for name, value in record["metrics"].items() if name != "mean_return"} == expected["metrics"]


@pytest.mark.parametrize("result", ORACLE["play"], ids=lambda result: f"{result['setting']}-{result['agent']}")
def test_play_reproduces_the_replaced_loop(result):
    setting, modality = evaluation.paper_settings("GeneralPoints-v0")[result["setting"]]
    record = evaluate(
        setting=setting, modality=modality, split="all", episodes=result["episodes"], seed=2, agent=AGENTS[result["agent"]](),
        env_kwargs={"resolution": 64}, progress=False,
    )
    successes = record.metrics["success_rate"].value * record.episodes
    assert (successes, record.metrics["mean_return"].value, record.metrics["mean_turns"].value) == (
        result["successes"], result["mean_return"], result["mean_answers"]
    )


def test_play_command_line(capsys):
    argv = ["play", "--setting", "GP-L id", "--agent", "expert", "random", "--episodes", "3", "--resolution", "64"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| setting | agent | episodes | success rate | mean return | answers per episode |"
    # Random text is a missing formula (-3) five times, then the unread sixth answer (-1).
    assert lines[2:] == ["| GP-L id | expert | 3 | 100.0% | +5.00 | 1.00 |", "| GP-L id | random | 3 | 0.0% | -16.00 | 6.00 |"]

"""The rollout engine: token layout, log-prob consistency, grouping and batching on tiny Qwen-VL policies;
model-free agents without a policy, checked against the per-episode loop it replaced; the statistics."""

import gymnasium as gym
import pytest
import torch
from gymnasium.wrappers import TimeLimit

import environments  # noqa: F401  (registers the environments)
from agents.baselines import ExpertAgent
from agents.chat import ChatTurn, Dialogue
from agents.tiny import ARCHITECTURES
from amft_vlm.rollout.engine import RolloutEngine, RolloutStats
from amft_vlm.rollout.episode_metrics import EpisodeOutcome
from tests.amft_vlm.model_free import AGENTS, ORACLE, episode_summary
from tests.model_hooks import LogitBias

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RESOLUTION = 64


class RecordDialogues(gym.Wrapper):
    """Records, per episode, the dialogues as text: the environment's messages and the answers it got."""

    def __init__(self, env):
        super().__init__(env)
        self.episodes = []

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        self.episodes.append([Dialogue.start(observation["text"], image=observation.get("image"))])
        return observation, info

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        dialogues = self.episodes[-1]
        dialogues[-1] = dialogues[-1].with_assistant(action)
        if not (terminated or truncated):
            if info.get("new_dialogue"):
                dialogues.append(Dialogue.start(observation["text"], image=observation.get("image")))
            else:
                dialogues[-1] = dialogues[-1].with_user(observation["text"])
        return observation, reward, terminated, truncated, info


class ExpertOnSecondAttempt(gym.Wrapper):
    """Replaces the second answer of every dialogue with the expert's, so VIRL dialogues restart.

    A random policy never answers VIRL correctly; with this wrapper every decision point gets one
    policy answer (wrong, with feedback) and one correct answer (a fresh dialogue follows), so
    episodes of a sampling policy span several segments.
    """

    def reset(self, **kwargs):
        self.answers_in_dialogue = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        if self.answers_in_dialogue >= 1:
            action = self.env.unwrapped.expert_response()
        observation, reward, terminated, truncated, info = self.env.step(action)
        self.answers_in_dialogue = 0 if info.get("new_dialogue") else self.answers_in_dialogue + 1
        return observation, reward, terminated, truncated, info


def _general_points(modality):
    kwargs = {"modality": modality, "resolution": RESOLUTION}
    return lambda: RecordDialogues(gym.make("GeneralPoints-v0", **kwargs))


def _virl_with_restarts(modality, max_steps=5):
    kwargs = {"modality": modality, "resolution": RESOLUTION}
    return lambda: RecordDialogues(
        TimeLimit(ExpertOnSecondAttempt(gym.make("VIRL-v0", **kwargs)), max_episode_steps=max_steps)
    )


ENVIRONMENTS = {
    "general-points-vision": _general_points("vision"),
    "virl-vision": _virl_with_restarts("vision"),
}


def _summary(trajectory):
    """Everything of a trajectory but the float log-probs, as plain values."""
    return (
        [
            (list(map(int, s.token_ids)), s.loss_mask.tolist(), s.turn_spans, s.image_index)
            for s in trajectory.segments
        ],
        trajectory.turn_rewards,
        trajectory.success,
        trajectory.seed,
        trajectory.group,
    )


@pytest.mark.parametrize("env_name", list(ENVIRONMENTS))
def test_loss_mask_covers_exactly_the_generated_tokens(tiny_policies, env_name):
    policy = tiny_policies["qwen2-vl"]
    engine = RolloutEngine(policy, ENVIRONMENTS[env_name], num_envs=1, temperature=1.0, max_new_tokens=10)
    with LogitBias(policy, bias=3.0):
        trajectories, _ = engine.collect([0, 1], sampling_seed=0, progress=False)
    (recorder,) = engine.envs
    stop_tokens = set(policy.stop_token_ids)
    endings = set()

    for trajectory, dialogues in zip(trajectories, recorder.episodes, strict=True):
        assert len(trajectory.segments) == len(dialogues)
        for segment, dialogue in zip(trajectory.segments, dialogues, strict=True):
            tokens, mask = torch.as_tensor(segment.token_ids), segment.loss_mask
            assert not mask[: segment.prompt_length].any()
            assert not mask[tokens == policy.image_token_id].any()
            answers = [turn.text for turn in dialogue.turns if turn.role == "assistant"]
            assert len(answers) == segment.num_turns
            for turn, answer in enumerate(answers):
                # The trainable span decodes to exactly the text the environment got, plus the stop
                # token when the policy generated one.
                response = segment.response_token_ids(turn)
                stopped = response[-1] in stop_tokens
                assert policy.decode(response[:-1] if stopped else response) == answer
                endings.add(policy.decode(response[-1:]) if stopped else "cut off")
            # Everything else is the chat template's text of the dialogue: prompt, image, messages.
            texts = iter(
                policy.decode(span[:-1] if span[-1] == policy.end_of_turn_token_id else span)
                for span in map(segment.response_token_ids, range(segment.num_turns))
            )
            rendered_dialogue = Dialogue(
                turns=tuple(
                    ChatTurn("assistant", next(texts)) if turn.role == "assistant" else turn
                    for turn in dialogue.turns
                ),
                image=dialogue.image,
            )
            expected = policy.render(rendered_dialogue, add_generation_prompt=False)
            image_tokens = int((tokens == policy.image_token_id).sum())
            expected = expected.replace("<|image_pad|>", "<|image_pad|>" * image_tokens)
            closing = "\n" if tokens[-1] == policy.end_of_turn_token_id else "<|im_end|>\n"
            assert policy.decode(tokens.tolist()) + closing == expected
            assert (segment.image_index is not None) == (image_tokens > 0)
    assert {"<|im_end|>", "cut off"} <= endings  # both ways a response ends were exercised


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("env_name", list(ENVIRONMENTS))
def test_teacher_forcing_reproduces_the_sampling_logprobs(tiny_policies, arch, env_name):
    policy = tiny_policies[arch]
    engine = RolloutEngine(policy, ENVIRONMENTS[env_name], num_envs=2, temperature=1.0, max_new_tokens=12)
    with LogitBias(policy, bias=3.0):
        trajectories, _ = engine.collect([0, 1], sampling_seed=1, progress=False)
        sequences, targets, sampled = [], [], []
        for trajectory in trajectories:
            sequences += trajectory.token_sequences(policy)
            targets += [segment.trainable_positions for segment in trajectory.segments]
            sampled += [segment.sampling_logprobs[segment.loss_mask] for segment in trajectory.segments]
        with torch.no_grad():
            teacher_forced = policy.token_logprobs(
                sequences, targets, temperature=trajectories[0].sampling_temperature
            )

    assert all(trajectory.num_turns > 1 for trajectory in trajectories)
    assert len({len(sequence) for sequence in sequences}) > 1  # the batch is really left-padded
    assert all(sequence.images is not None for sequence in sequences)
    if env_name.startswith("virl"):
        assert all(len(trajectory.segments) > 1 for trajectory in trajectories)
    differences = torch.cat([(tf - s).abs() for tf, s in zip(teacher_forced, sampled, strict=True)])
    assert differences.numel() == sum(t.num_response_tokens for t in trajectories)
    assert differences.max().item() < 1e-4


def test_group_sampling_shares_the_start_state_and_not_the_samples(tiny_policies):
    policy = tiny_policies["qwen2.5-vl"]
    engine = RolloutEngine(
        policy, "GeneralPoints-v0", env_kwargs={"modality": "language"}, num_envs=4, max_new_tokens=8
    )
    trajectories, stats = engine.collect([11, 12], group_size=3, sampling_seed=5, progress=False)

    assert [(t.seed, t.group) for t in trajectories] == [(11, 0)] * 3 + [(12, 1)] * 3
    for group in (trajectories[:3], trajectories[3:]):
        prompts = {tuple(map(int, t.segments[0].token_ids[: t.segments[0].prompt_length])) for t in group}
        assert len(prompts) == 1  # same seed, same hand
        first_answers = {tuple(t.segments[0].response_token_ids(0)) for t in group}
        assert len(first_answers) == 3  # distinct sampling randomness
    first, other = (t.segments[0] for t in (trajectories[0], trajectories[3]))
    assert list(map(int, first.token_ids[: first.prompt_length])) != list(map(int, other.token_ids[: other.prompt_length]))

    again, _ = engine.collect([11, 12], group_size=3, sampling_seed=5, progress=False)
    assert again == trajectories
    other, _ = engine.collect([11, 12], group_size=3, sampling_seed=6, progress=False)
    assert other != trajectories
    assert stats.episodes == 6


def test_sampled_episodes_do_not_depend_on_batch_neighbours_or_how_the_seeds_are_split(tiny_policies_float64):
    """Each episode draws from its own generator: num_envs or a split over processes changes nothing (in float64,
    where the batch layouts' rounding cannot move a draw across a token boundary)."""
    policy = tiny_policies_float64["qwen2-vl"]

    def collect(seeds, num_envs):
        engine = RolloutEngine(policy, "GeneralPoints-v0", env_kwargs={"modality": "language"}, num_envs=num_envs, max_new_tokens=10)
        trajectories, _ = engine.collect(seeds, group_size=2, sampling_seed=7, progress=False)
        return [(t.seed, [list(map(int, s.token_ids)) for s in t.segments]) for t in trajectories]

    together = collect([21, 22, 23], num_envs=6)
    assert collect([21, 22, 23], num_envs=1) == together
    assert collect([21, 23], num_envs=3) + collect([22], num_envs=2) == [together[i] for i in (0, 1, 4, 5, 2, 3)]


@pytest.mark.parametrize(
    ("arch", "env_id", "env_kwargs"),
    [
        ("qwen2-vl", "GeneralPoints-v0", {"modality": "vision", "resolution": RESOLUTION}),
        ("qwen2.5-vl", "VIRL-v0", {"modality": "language"}),
    ],
)
def test_vectorised_engine_matches_one_at_a_time_under_greedy_decoding(
    tiny_policies_float64, arch, env_id, env_kwargs
):
    """In float64: batch layouts differ by rounding only, which cannot break a greedy near-tie there."""
    policy = tiny_policies_float64[arch]
    seeds = range(5)
    results = {}
    # One at a time and re-encoding every turn is the reference; batching and cache reuse must agree.
    for num_envs, reuse_cache in ((1, False), (4, True), (4, False)):
        engine = RolloutEngine(
            policy,
            env_id,
            env_kwargs=env_kwargs,
            num_envs=num_envs,
            greedy=True,
            max_new_tokens=12,
            reuse_cache=reuse_cache,
        )
        results[num_envs, reuse_cache], _ = engine.collect(seeds, progress=False)

    reference = results[1, False]
    for key in ((4, True), (4, False)):
        assert [_summary(t) for t in results[key]] == [_summary(t) for t in reference]
        for vectorised, single in zip(results[key], reference, strict=True):
            for a, b in zip(vectorised.segments, single.segments, strict=True):
                torch.testing.assert_close(a.sampling_logprobs, b.sampling_logprobs, rtol=0, atol=1e-6)  # stored in float32


def test_later_turns_feed_only_the_new_tokens_when_the_cache_is_reused(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    # Whole prompts, not a shared prefix run once and the rest (tested in tests/agents/test_vlm_policy.py).
    prefill_lengths = {}
    for reuse_cache in (False, True):
        lengths = prefill_lengths[reuse_cache] = []

        def record(module, args, kwargs, lengths=lengths):
            if kwargs["input_ids"].shape[1] > 1:
                lengths.append(kwargs["input_ids"].shape[1])

        handle = policy.model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            engine = RolloutEngine(
                policy,
                "GeneralPoints-v0",
                env_kwargs={"modality": "language"},
                num_envs=2,
                max_new_tokens=8,
                reuse_cache=reuse_cache,
            )
            whole_prompts = policy.responder(max_new_tokens=8, keep_cache=reuse_cache, share_prefix=False)
            trajectories, _ = engine.collect([0, 1], sampling_seed=0, progress=False, responder=whole_prompts)
        finally:
            handle.remove()
        assert all(t.num_turns > 2 for t in trajectories)
    # Without reuse every prefill grows with the dialogue; with it, only the first one is a whole prompt.
    assert prefill_lengths[False] == sorted(prefill_lengths[False])
    assert prefill_lengths[True][0] == prefill_lengths[False][0]
    # A later turn feeds the last response token and the environment's reply (about 100 tokens here).
    assert max(prefill_lengths[True][1:]) < prefill_lengths[True][0] / 3
    assert sum(prefill_lengths[True]) < sum(prefill_lengths[False]) / 3


def _round_sizes(turns_per_episode, num_envs):
    """Batch size of each generate round when free slots take the next episode before the next round."""
    queue = list(turns_per_episode)
    slots = [queue.pop(0) for _ in range(min(num_envs, len(queue)))]
    sizes = []
    while slots:
        sizes.append(len(slots))
        slots = [turns - 1 for turns in slots]
        slots = [turns for turns in slots if turns > 0] + [
            queue.pop(0) for turns in slots if turns == 0 and queue
        ]
    return sizes


def test_finished_slots_start_the_next_episode_before_the_next_generate(tiny_policies, monkeypatch):
    policy = tiny_policies["qwen2-vl"]
    batch_sizes = []
    generate = policy.generate

    def spy(prompts, **kwargs):
        batch_sizes.append(len(prompts))
        return generate(prompts, **kwargs)

    monkeypatch.setattr(policy, "generate", spy)
    engine = RolloutEngine(policy, _virl_with_restarts("language", max_steps=4), num_envs=3, max_new_tokens=6)
    with LogitBias(policy, bias=3.0):
        trajectories, stats = engine.collect(range(7), sampling_seed=0, progress=False)

    turns = [trajectory.num_turns for trajectory in trajectories]
    assert sum(batch_sizes) == sum(turns)  # every generated response was used
    assert sorted(batch_sizes, reverse=True) == batch_sizes
    assert batch_sizes == _round_sizes(turns, 3)
    assert stats.generate_calls == len(batch_sizes)


@pytest.mark.parametrize(
    ("env_id", "env_kwargs"),
    [
        ("GeneralPoints-v0", {"modality": "language"}),
        ("GeneralPoints-v0", {"modality": "vision", "resolution": RESOLUTION}),
        ("VIRL-v0", {"modality": "language"}),
        ("VIRL-v0", {"modality": "vision", "resolution": RESOLUTION}),
    ],
)
def test_the_expert_solves_every_episode_through_the_engine(tiny_policies, env_id, env_kwargs):
    policy = tiny_policies["qwen2.5-vl"]
    engine = RolloutEngine(policy, env_id, env_kwargs=env_kwargs, num_envs=3)
    trajectories, stats = engine.collect(range(4), responder=ExpertAgent(), progress=False)

    assert stats.success_rate == 1.0 and stats.generate_calls == 0
    for trajectory in trajectories:
        assert trajectory.success and trajectory.source == "expert" and not trajectory.has_sampling_logprobs
        assert trajectory.env_id == env_id
        if env_id == "VIRL-v0":
            assert len(trajectory.segments) == trajectory.num_turns > 1  # one correct answer per dialogue
        for segment in trajectory.segments:
            assert not segment.loss_mask[torch.as_tensor(segment.token_ids) == policy.image_token_id].any()
            for turn in range(segment.num_turns):
                assert segment.response_token_ids(turn)[-1] == policy.end_of_turn_token_id


def test_stats_are_computed_from_the_outcomes():
    outcomes = [
        EpisodeOutcome(0, ("wrong_numbers", "correct"), (-1.0, 5.0), True),
        EpisodeOutcome(1, ("missing_formula",) * 5 + ("out_of_attempts",), (-3.0,) * 5 + (-1.0,), False),
        EpisodeOutcome(2, ("correct",), (5.0,), True),
    ]
    stats = RolloutStats.from_outcomes(outcomes, response_tokens=90, total_tokens=600, wall_seconds=2.0, generate_seconds=1.5, generate_calls=6)
    # Returns 4, -16 and 5; 2, 6 and 1 answers.
    assert stats == RolloutStats(
        episodes=3, successes=2, mean_return=-7 / 3, mean_turns=3.0, response_tokens=90, total_tokens=600,
        wall_seconds=2.0, generate_seconds=1.5, generate_calls=6,
    )
    assert (stats.success_rate, stats.episodes_per_second, stats.response_tokens_per_second) == (2 / 3, 1.5, 45.0)
    assert stats.summary() == (
        "3 episodes: success rate 66.7%, mean return -2.33, 3.00 turns and 30.0 response tokens per episode; "
        "1.50 episodes/s, 45 response tokens/s"
    )
    text_only = RolloutStats.from_outcomes(outcomes[2:], wall_seconds=0.5)
    assert text_only.summary() == "1 episodes: success rate 100.0%, mean return +5.00, 1.00 turns per episode; 2.00 episodes/s"
    assert RolloutStats.from_outcomes([], wall_seconds=0.0).episodes == 0


class ScriptedAnswers(gym.Wrapper):
    """Whatever it is told, answers ``"no idea"`` the first ``wrong[seed]`` times of an episode, then the expert's answer."""

    def __init__(self, env, wrong):
        super().__init__(env)
        self.wrong = wrong

    def reset(self, *, seed=None, options=None):
        self.wrong_left = self.wrong[seed]
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        action = "no idea" if self.wrong_left > 0 else self.env.unwrapped.expert_response()
        self.wrong_left -= 1
        return self.env.step(action)


def test_stats_of_a_collection_with_known_answers(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    # GeneralPoints: "no idea" is missing_formula (-3), a correct answer +5 ends the episode, the answer
    # after 5 failures is out_of_attempts (-1) and ends it unsolved.
    wrong = {10: 0, 11: 2, 12: 5}
    env = lambda: ScriptedAnswers(gym.make("GeneralPoints-v0", modality="language"), wrong)  # noqa: E731
    engine = RolloutEngine(policy, env, num_envs=3, max_new_tokens=4)
    trajectories, stats = engine.collect([10, 11, 12], sampling_seed=0, progress=False)

    assert (stats.episodes, stats.successes, stats.generate_calls) == (3, 2, 6)  # 6 rounds: the longest episode
    assert stats.mean_return == pytest.approx((5 + (-3 - 3 + 5) + (-15 - 1)) / 3)
    assert stats.mean_turns == pytest.approx((1 + 3 + 6) / 3)
    assert 10 <= stats.response_tokens <= 10 * 4  # 10 answers of 1 to 4 generated tokens
    assert 0 < stats.generate_seconds <= stats.wall_seconds
    assert "success rate 66.7%, mean return -4.00, 3.33 turns" in stats.summary()
    assert [t.turn_rewards for t in trajectories] == [(5.0,), (-3.0, -3.0, 5.0), (-3.0,) * 5 + (-1.0,)]

    outcomes, again = engine.play([10, 11, 12], sampling_seed=0, progress=False)
    assert [outcome.verdicts for outcome in outcomes] == [
        ("correct",), ("missing_formula", "missing_formula", "correct"), ("missing_formula",) * 5 + ("out_of_attempts",)
    ]
    assert (again.episodes, again.successes, again.mean_return, again.response_tokens) == (3, 2, stats.mean_return, stats.response_tokens)
    engine.close()


@pytest.mark.parametrize("case", ORACLE["episodes"], ids=lambda case: f"{case['env_id']}-{case['env_kwargs']['modality']}-{case['agent']}")
def test_model_free_agents_play_as_the_per_episode_loop_did(case):
    """Dialogues, images, rewards, verdicts and success of every episode equal those the replaced loop recorded."""
    played = []
    seeds = [episode["seed"] for episode in case["episodes"]]
    with RolloutEngine(None, case["env_id"], env_kwargs=case["env_kwargs"]) as engine:
        outcomes, stats = engine.play(seeds, responder=AGENTS[case["agent"]](), progress=False, on_episode=played.append)

    assert [episode_summary(episode) for episode in played] == case["episodes"]
    assert [outcome.seed for outcome in outcomes] == seeds
    assert stats.successes == sum(episode["success"] for episode in case["episodes"])
    assert (stats.response_tokens, stats.generate_calls) == (0, 0)


@pytest.mark.parametrize(
    ("env_id", "env_kwargs", "agent"),
    [("GeneralPoints-v0", {"modality": "language"}, "format-only"), ("VIRL-v0", {"modality": "vision", "resolution": RESOLUTION}, "once-wrong")],
)
def test_an_agent_plays_the_same_episodes_with_and_without_a_policy(tiny_policies, env_id, env_kwargs, agent):
    policy = tiny_policies["qwen2-vl"]
    seeds = [3, 4, 5]
    as_text, as_tokens = [], []
    with RolloutEngine(None, env_id, env_kwargs=env_kwargs) as engine:
        text_outcomes, _ = engine.play(seeds, responder=AGENTS[agent](), progress=False, on_episode=as_text.append)
    with RolloutEngine(policy, env_id, env_kwargs=env_kwargs) as engine:
        token_outcomes, _ = engine.play(seeds, responder=AGENTS[agent](), progress=False, on_episode=as_tokens.append)

    assert token_outcomes == text_outcomes
    for text, tokens in zip(as_text, as_tokens, strict=True):
        trajectory = tokens.trajectory
        assert text.trajectory is None and tokens.dialogues == ()
        assert trajectory.turn_rewards == tuple(reward for recorded in text.dialogues for reward in recorded.rewards)
        assert [segment.num_turns for segment in trajectory.segments] == [len(recorded.rewards) for recorded in text.dialogues]
        for segment, recorded in zip(trajectory.segments, text.dialogues, strict=True):
            answers = [turn.text for turn in recorded.dialogue.turns if turn.role == "assistant"]
            assert [policy.decode(segment.response_token_ids(turn)[:-1]) for turn in range(segment.num_turns)] == answers


def test_an_engine_without_a_policy_needs_an_agent_and_samples_nothing():
    engine = RolloutEngine(None, "GeneralPoints-v0")
    with pytest.raises(ValueError, match="needs a responder"):
        engine.play([0], progress=False)
    with pytest.raises(ValueError, match="samples nothing"):
        engine.play([0], responder=ExpertAgent(), sampling_seed=0, progress=False)
    with pytest.raises(ValueError, match="needs a policy"):
        engine.collect([0], responder=ExpertAgent(), progress=False)
    outcomes, stats = engine.play([0, 1], group_size=2, responder=ExpertAgent(), progress=False)
    assert [outcome.seed for outcome in outcomes] == [0, 0, 1, 1] and stats.success_rate == 1.0
    engine.close()


def test_invalid_settings_are_rejected_and_no_seeds_mean_no_episodes(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    with pytest.raises(ValueError, match="num_envs"):
        RolloutEngine(policy, "GeneralPoints-v0", num_envs=0)
    with pytest.raises(ValueError, match="temperature"):
        RolloutEngine(policy, "GeneralPoints-v0", temperature=0.0)
    with pytest.raises(ValueError, match="env_kwargs"):
        RolloutEngine(policy, _general_points("language"), env_kwargs={"modality": "language"})
    with pytest.raises(ValueError, match="group_size"):
        RolloutEngine(policy, "GeneralPoints-v0").collect([0], group_size=0)
    trajectories, stats = RolloutEngine(policy, "GeneralPoints-v0").collect([], progress=False)
    assert trajectories == [] and stats.episodes == 0

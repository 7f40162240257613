"""The answering seam: the policy, a model-free agent and a served model all answer through `Responder` in the one
episode loop (`RolloutEngine`), which asks each with the dialogues it should and steps a row as soon as its answer is in."""

import threading
from concurrent.futures import Future

import pytest

import environments  # noqa: F401  (registers the environments)
from agents.base import Agent
from agents.baselines import ExpertAgent
from agents.policy import PolicyResponder
from agents.responder import NoAnswer, answered
from amft_vlm.evaluation import evaluate as evaluation
from amft_vlm.evaluation.served import ServedEndpoint, ServedResponder
from amft_vlm.rollout.engine import RolloutEngine
from amft_vlm.rollout.episode_metrics import TRANSPORT_FAILURE
from tests.amft_vlm.chat_server import ChatServer, expert_answer, expert_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GP_LANGUAGE = ("GeneralPoints-v0", {"modality": "language"})
MAX_PIXELS = 28 * 28 * 16


class Recording:
    """Wraps a responder and keeps every batch of requests it was asked: what the engine really sends it."""

    def __init__(self, responder):
        self.responder = responder
        self.name = responder.name
        self.answers_in_tokens = responder.answers_in_tokens
        self.batches = []
        if responder.answers_in_tokens:
            self.sampling_temperature = responder.sampling_temperature

    def respond(self, requests):
        self.batches.append(list(requests))
        return self.responder.respond(requests)


def _asked_dialogues(recording):
    """Per episode, the messages of each dialogue it was asked to answer, in order."""
    asked = {}
    for batch in recording.batches:
        for request in batch:
            asked.setdefault(request.episode, []).append(request.dialogue.to_messages())
    return asked


def _recorded_dialogues(episodes):
    """Per episode, the engine's record of each dialogue cut before each of its answers: what was there to answer."""
    return {
        episode.index: [
            recorded.dialogue.to_messages()[: 2 * turn + 1]
            for recorded in episode.dialogues
            for turn in range(len(recorded.rewards))
        ]
        for episode in episodes
    }


class WrongFirstInEachDialogue:
    """A text responder reading the dialogue: wrong to a dialogue's first user turn, the expert's answer after feedback."""

    name = "wrong-first"
    answers_in_tokens = False

    def respond(self, requests):
        return [
            answered("no idea" if len(request.dialogue.turns) == 1 else request.env.unwrapped.expert_response())
            for request in requests
        ]


def test_a_text_responder_is_asked_each_episodes_dialogue_so_far_in_batches_of_the_active_slots():
    """VIRL, wrong once at every point: multi-turn dialogues and restarted ones. Every answer is asked for with exactly
    the dialogue the engine records up to it; one batch per round holds every active slot."""
    recording, episodes = Recording(WrongFirstInEachDialogue()), []
    with RolloutEngine(None, "VIRL-v0", env_kwargs={"modality": "language"}, num_envs=2) as engine:
        outcomes, _ = engine.play(range(3), responder=recording, progress=False, on_episode=episodes.append)
    assert all(outcome.success for outcome in outcomes)
    assert _asked_dialogues(recording) == _recorded_dialogues(episodes)
    assert [len(batch) for batch in recording.batches][0] == 2 and max(len(batch) for batch in recording.batches) == 2
    turns = [[request.turn for request in batch if request.episode == 0] for batch in recording.batches]
    assert [turn for batch in turns for turn in batch] == list(range(len(outcomes[0].rewards)))
    assert all(request.prompt is None for batch in recording.batches for request in batch)  # no tokens without a policy


def test_the_policy_answers_through_the_same_loop_in_tokens(tiny_policies):
    """With a policy the engine asks in tokens: each prompt of an episode extends the last one with the answer's own token
    ids (nothing is re-tokenised), the text dialogue comes along, and `collect`'s trajectories hold those tokens."""
    policy = tiny_policies["qwen2-vl"]
    engine = RolloutEngine(policy, "GeneralPoints-v0", env_kwargs={"modality": "language"}, num_envs=2, max_new_tokens=6)
    recording = Recording(engine.policy_responder)
    trajectories, stats = engine.collect([0, 1, 2], responder=recording, sampling_seed=0, progress=False)
    assert isinstance(recording.responder, PolicyResponder) and stats.generate_calls == len(recording.batches)
    by_episode = {}
    for batch in recording.batches:
        for request in batch:
            by_episode.setdefault(request.episode, []).append(request)
    for index, requests in by_episode.items():
        first = requests[0]
        assert first.prompt.token_ids == policy.encode_dialogue(first.dialogue).token_ids
        assert len(requests) == len(trajectories[index].turn_rewards)
        for before, after in zip(requests, requests[1:], strict=False):
            assert after.prompt.token_ids[: len(before.prompt.token_ids)] == before.prompt.token_ids
            assert len(after.dialogue.turns) == len(before.dialogue.turns) + 2
        assert trajectories[index].segments[-1].token_ids[: len(requests[-1].prompt.token_ids)] == requests[-1].prompt.token_ids


class HeldBack(Agent):
    """The expert, except that episode 0's first answer arrives only once every other episode has ended."""

    name = "held-back"

    def __init__(self):
        self.others_ended = threading.Event()

    def respond(self, requests):
        futures = []
        for request in requests:
            text = request.env.unwrapped.expert_response()
            if request.episode == 0 and request.turn == 0:
                held = Future()
                threading.Thread(target=self._release, args=(held, text), daemon=True).start()
                futures.append(held)
            else:
                futures.append(answered(text))
        return futures

    def _release(self, future, text):
        self.others_ended.wait(timeout=30)  # an engine that waited for the slowest row would sit here until then
        future.set_result(text)


def test_a_row_whose_answer_is_in_is_stepped_without_waiting_for_a_slow_row():
    ended = []
    responder = HeldBack()

    def on_episode(episode):
        ended.append(episode.index)
        if set(ended) == {1, 2, 3}:
            responder.others_ended.set()

    with RolloutEngine(None, GP_LANGUAGE[0], env_kwargs=GP_LANGUAGE[1], num_envs=2) as engine:
        outcomes, _ = engine.play(range(4), responder=responder, progress=False, on_episode=on_episode)
    assert ended == [1, 2, 3, 0]
    assert all(outcome.success for outcome in outcomes)


class FailsEpisode(Agent):
    """The expert, except that it cannot answer episode 1's second request, and raises at episode 2's first."""

    name = "fails"

    def respond(self, requests):
        futures = []
        for request in requests:
            if request.episode == 1 and request.turn == 1:
                futures.append(answered(NoAnswer(TRANSPORT_FAILURE, "no route to host")))
            elif request.episode == 2:
                future = Future()
                future.set_exception(RuntimeError("the server went away"))
                futures.append(future)
            else:
                futures.append(answered("no idea" if request.turn == 0 else request.env.unwrapped.expert_response()))
        return futures


def test_an_unanswered_request_ends_its_episode_and_a_failed_one_stops_the_run():
    with RolloutEngine(None, GP_LANGUAGE[0], env_kwargs=GP_LANGUAGE[1]) as engine:
        outcomes, _ = engine.play(range(2), responder=FailsEpisode(), progress=False)
        assert outcomes[0].success and len(outcomes[0].rewards) == 2
        assert not outcomes[1].success and outcomes[1].verdicts[-1] == TRANSPORT_FAILURE and outcomes[1].rewards[-1] == 0.0
        assert len(outcomes[1].verdicts) == 2
        with pytest.raises(RuntimeError, match="went away"):
            engine.play(range(3), responder=FailsEpisode(), progress=False)


def test_a_token_responder_needs_an_engine_that_records_tokens(tiny_policies):
    responder = tiny_policies["qwen2-vl"].responder()
    engine = RolloutEngine(None, GP_LANGUAGE[0], env_kwargs=GP_LANGUAGE[1])
    with pytest.raises(ValueError, match="answers token prompts"):
        engine.play([0], responder=responder, progress=False)


def test_evaluation_only_chooses_the_responder(tmp_path, monkeypatch):
    """The policy, an agent and a served model are each handed to the one engine loop; the served model is asked
    exactly the dialogues that loop records, and scores what the agent giving the same answers scores."""
    played = []
    play = RolloutEngine.play

    def recorded_play(engine, seeds, *, responder=None, **kwargs):
        recording, episodes = Recording(responder), []
        outcomes, stats = play(engine, seeds, responder=recording, on_episode=episodes.append, **kwargs)
        played.append((recording, episodes))
        return outcomes, stats

    monkeypatch.setattr(RolloutEngine, "play", recorded_play)
    common = {"env_id": GP_LANGUAGE[0], "modality": "language", "episodes": 3, "seed": 5, "progress": False}
    agent = evaluation.evaluate(agent=ExpertAgent(), **common)
    model = evaluation.evaluate(model="tiny:qwen2-vl", max_new_tokens=4, num_envs=2, **common)
    with ChatServer(expert_answer(expert_table(*GP_LANGUAGE, range(5, 8), max_pixels=MAX_PIXELS))) as server:
        endpoint = ServedEndpoint(server.url, "test-model", cache_dir=None, max_pixels=MAX_PIXELS, concurrency=2)
        served = evaluation.evaluate(served=endpoint, **common)
        sent = [request.messages for request in server.requests]
    kinds = [type(recording.responder) for recording, _ in played]
    assert kinds == [ExpertAgent, PolicyResponder, ServedResponder]
    assert (agent.model_kind, model.model_kind, served.model_kind) == ("agent", "model", "served")
    assert (served.metrics, served.verdict_shares) == (agent.metrics, agent.verdict_shares)
    served_recording, served_episodes = played[2]
    asked = [request.dialogue.to_messages() for batch in served_recording.batches for request in batch]
    assert sorted(map(repr, sent)) == sorted(map(repr, asked))
    assert _asked_dialogues(served_recording) == _recorded_dialogues(served_episodes)

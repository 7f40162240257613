"""GeneralPoints-v0 as a Gymnasium environment: API conformance, arguments, dealing, determinism."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AsyncVectorEnv

import environments  # noqa: F401
from environments.general_points.cards import Card, card_value
from environments.general_points.solver import find_solution, hand_split, is_solvable
from environments.general_points.verifier import MAX_ANSWER_CHARS

SMALL = 96  # image side used where the resolution does not matter


def make(**kwargs):
    kwargs.setdefault("resolution", SMALL)
    return gym.make("GeneralPoints-v0", **kwargs)


@pytest.mark.parametrize("modality", ["language", "vision"])
@pytest.mark.parametrize("face_cards", ["10", "11-12-13"])
@pytest.mark.parametrize("suits", ["black", "red", "mixed"])
def test_check_env_passes_on_every_variant(modality, face_cards, suits):
    env = make(modality=modality, face_cards=face_cards, suits=suits, render_mode="rgb_array")
    check_env(env.unwrapped)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_check_env_passes_on_splits(split):
    check_env(make(modality="language", split=split).unwrapped)


def test_environment_id_with_module_prefix_works_without_prior_import():
    env = gym.make("environments:GeneralPoints-v0", modality="language")
    observation, info = env.reset(seed=0)
    assert "24" in observation["text"] and len(info["cards"]) == 4


def test_defaults_are_the_vision_training_setting():
    env = gym.make("GeneralPoints-v0").unwrapped
    assert (env.modality, env.face_cards, env.suits, env.target, env.num_cards, env.max_attempts, env.split, env.resolution) == (
        "vision", "10", "black", 24, 4, 5, "all", 1200
    )
    observation, _ = env.reset(seed=0)
    assert observation["image"].shape == (1200, 1200, 3) and observation["image"].dtype == np.uint8


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"modality": "audio"}, "modality"),
        ({"face_cards": "11"}, "face_cards"),
        ({"suits": "blue"}, "suits"),
        ({"split": "validation"}, "split"),
        ({"render_mode": "ansi"}, "render_mode"),
        ({"num_cards": 0}, "num_cards"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"resolution": 10}, "resolution"),
        ({"target": "24"}, "target"),
        ({"num_cards": True}, "num_cards"),
        ({"max_attempts": True}, "max_attempts"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        make(**kwargs)


def test_fixed_hand_from_options():
    env = make(modality="language")
    observation, info = env.reset(seed=0, options={"cards": ["HA", "S3", "CK", "D6"]})
    assert info["cards"] == ["HA", "S3", "CK", "D6"] and info["numbers"] == [1, 3, 10, 6]
    assert "['A', '3', 'K', '6']" in observation["text"]
    _, info = env.reset(options={"cards": ["st", "c4", "H4", "dq"]})
    assert info["cards"] == ["S10", "C4", "H4", "DQ"]


@pytest.mark.parametrize(
    ("cards", "reason"),
    [(["HA", "HA", "HA", "HA"], "cannot make 24"), (["XA", "S3", "CK", "D6"], "card code"), (["HA", "S3"], "4 card codes"), ("HA", "4 card codes")],
)
def test_bad_fixed_hands_raise_with_the_reason(cards, reason):
    with pytest.raises(ValueError, match=reason):
        make(modality="language").reset(options={"cards": cards})


@pytest.mark.parametrize("face_cards", ["10", "11-12-13"])
@pytest.mark.parametrize("suits", ["black", "red", "mixed"])
def test_dealt_hands_follow_the_setting(face_cards, suits):
    env = make(modality="language", face_cards=face_cards, suits=suits)
    allowed_suits = {"black": {"S", "C"}, "red": {"H", "D"}, "mixed": {"S", "C", "H", "D"}}[suits]
    for seed in range(200):
        _, info = env.reset(seed=seed)
        cards = [Card.from_code(code) for code in info["cards"]]
        assert {card.suit for card in cards} <= allowed_suits
        assert info["numbers"] == [card_value(card.rank, face_cards) for card in cards]
        assert is_solvable(info["numbers"])
        if face_cards == "11-12-13":
            assert any(card.rank >= 11 for card in cards)


def test_rank_distribution_is_uniform_with_replacement():
    env = make(modality="language", face_cards="10", suits="mixed")
    ranks = [Card.from_code(code).rank for seed in range(3000) for code in env.reset(seed=seed)[1]["cards"]]
    counts = np.bincount(ranks, minlength=14)[1:]
    # Solvability filtering skews ranks a little; every rank must still be common.
    assert counts.min() > 0.4 * counts.mean()


@pytest.mark.parametrize("face_cards", ["10", "11-12-13"])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_deals_only_its_own_hands(split, face_cards):
    env = make(modality="language", face_cards=face_cards, split=split)
    for seed in range(150):
        assert hand_split(env.reset(seed=seed)[1]["numbers"]) == split


def test_unknown_split_lists_the_splits():
    with pytest.raises(ValueError, match=r"split must be one of \('all', 'train', 'val', 'test'\); got 'validation'"):
        make(split="validation")


@pytest.mark.parametrize("modality", ["language", "vision"])
def test_same_seed_same_hand_and_image(modality):
    first, second = make(modality=modality), make(modality=modality)
    for seed in (0, 1, 12345):
        obs_a, info_a = first.reset(seed=seed)
        obs_b, info_b = second.reset(seed=seed)
        assert info_a["cards"] == info_b["cards"] and obs_a["text"] == obs_b["text"]
        if modality == "vision":
            assert np.array_equal(obs_a["image"], obs_b["image"])
    hands = {tuple(first.reset(seed=seed)[1]["cards"]) for seed in range(20)}
    assert len(hands) > 15


def test_unseeded_resets_continue_the_seeded_stream():
    env_a, env_b = make(modality="language"), make(modality="language")
    env_a.reset(seed=7)
    env_b.reset(seed=7)
    assert [env_a.reset()[1]["cards"] for _ in range(5)] == [env_b.reset()[1]["cards"] for _ in range(5)]


def test_vision_image_shows_the_hand_and_render_returns_it():
    env = make(modality="vision", render_mode="rgb_array")
    observation, _ = env.reset(seed=3)
    assert np.array_equal(env.render(), observation["image"])
    other, _ = env.reset(options={"cards": ["HA", "S3", "CK", "D6"]})
    assert not np.array_equal(other["image"], observation["image"])
    observation, *_ = env.step("not an answer")
    assert np.array_equal(observation["image"], other["image"])


def test_language_render_draws_the_cards_too():
    env = make(modality="language", render_mode="rgb_array")
    observation, _ = env.reset(seed=0)
    assert "image" not in observation
    assert env.render().shape == (SMALL, SMALL, 3)
    unrendered = make(modality="language")
    unrendered.reset(seed=0)
    assert unrendered.render() is None


def test_prompt_states_rule_and_format():
    language = make(modality="language").reset(seed=0)[0]["text"]
    vision = make(modality="vision", face_cards="11-12-13").reset(seed=0)[0]["text"]
    assert "J, Q and K each count as 10" in language and '"formula"' in language
    assert "J counts as 11, Q as 12 and K as 13" in vision and "image" in vision


def test_expert_solves_and_dialogue_alternates():
    env = make(modality="vision")
    observation, info = env.reset(seed=0)
    assert info["attempts_left"] == 5 and info["verdict"] == "" and not info["success"]
    observation, reward, terminated, truncated, info = env.step("{}")
    assert reward == -1.5 and info["attempts_left"] == 4 and not (terminated or truncated)
    assert "4 attempt(s) left" in observation["text"]
    observation, reward, terminated, truncated, info = env.step(env.unwrapped.expert_response())
    assert (reward, terminated, truncated, info["success"], info["verdict"]) == (5.0, True, False, True, "correct")


def test_sync_vector_env():
    envs = gym.make_vec("GeneralPoints-v0", num_envs=3, vectorization_mode="sync", modality="vision", resolution=SMALL)
    observations, infos = envs.reset(seed=11)
    assert observations["image"].shape == (3, SMALL, SMALL, 3) and len(observations["text"]) == 3
    answers = list(envs.call("expert_response"))
    observations, rewards, terminated, truncated, infos = envs.step(answers)
    assert rewards.tolist() == [5.0, 5.0, 5.0] and terminated.all() and infos["success"].all()
    envs.close()


def test_async_vector_env_without_shared_memory_matches_sync():
    def factory():
        return gym.make("GeneralPoints-v0", modality="vision", resolution=SMALL)

    async_envs = AsyncVectorEnv([factory] * 2, shared_memory=False)
    sync_envs = gym.vector.SyncVectorEnv([factory] * 2)
    try:
        async_obs, _ = async_envs.reset(seed=5)
        sync_obs, _ = sync_envs.reset(seed=5)
        assert list(async_obs["text"]) == list(sync_obs["text"])
        assert np.array_equal(async_obs["image"], sync_obs["image"])
        answers = list(async_envs.call("expert_response"))
        _, rewards, terminated, _, _ = async_envs.step(answers)
        assert rewards.tolist() == [5.0, 5.0] and terminated.all()
        _, rewards, _, _, infos = async_envs.step(["nonsense", "{}"])  # autoreset step: new episodes start
        assert infos["attempts_left"].tolist() == [5, 5]
    finally:
        async_envs.close()
        sync_envs.close()



# The hands the environment dealt for these seeds before hands of 5+ cards were searched for at reset:
# hands of up to 4 cards must never change.
PINNED_DEALS = {
    "10 all": {0: ["CQ", "S9", "S7", "S4"], 1: ["C4", "D5", "CQ", "C6"], 2: ["CJ", "D4", "C2", "S4"], 3: ["SJ", "D2", "D3", "H4"]},
    "11-12-13 test": {0: ["SJ", "S9", "S7", "D4"], 1: ["D2", "SQ", "HK", "C2"], 2: ["H5", "HJ", "HA", "D3"], 3: ["CA", "C2", "HK", "H6"]},
}
PINNED_EXPERT = {
    "10 all": '{"cards": ["J", "2", "3", "4"], "number": [10, 2, 3, 4], "formula": "2+3*4+10=24"}',
    "11-12-13 test": '{"cards": ["A", "2", "K", "6"], "number": [1, 2, 13, 6], "formula": "2*6+13-1=24"}',
}


@pytest.mark.parametrize("setting", PINNED_DEALS)
def test_four_card_deals_and_expert_answers_are_unchanged(setting):
    face_cards, split = setting.split()
    env = make(modality="language", suits="mixed", face_cards=face_cards, split=split)
    assert {seed: env.reset(seed=seed)[1]["cards"] for seed in PINNED_DEALS[setting]} == PINNED_DEALS[setting]
    assert env.unwrapped.expert_response() == PINNED_EXPERT[setting]


def test_action_space_ends_at_the_answer_length_cap():
    assert make(modality="language").action_space.max_length == MAX_ANSWER_CHARS


@pytest.mark.parametrize("num_cards", [5, 6, 7, 8])
@pytest.mark.parametrize("face_cards", ["10", "11-12-13"])
def test_large_hands_are_dealt_playable_and_reproducible(num_cards, face_cards):
    env = make(modality="language", num_cards=num_cards, face_cards=face_cards)
    again = make(modality="language", num_cards=num_cards, face_cards=face_cards)
    for seed in range(10):
        observation, info = env.reset(seed=seed)
        assert len(info["cards"]) == num_cards and again.reset(seed=seed)[1]["cards"] == info["cards"]
        assert info["numbers"] == [card_value(Card.from_code(code).rank, face_cards) for code in info["cards"]]
        assert find_solution(info["numbers"]) is not None
        if face_cards == "11-12-13":
            assert any(Card.from_code(code).rank >= 11 for code in info["cards"])
        _, reward, terminated, _, _ = env.step(env.unwrapped.expert_response())
        assert (reward, terminated) == (5.0, True)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_large_hands_follow_the_split_of_their_values(split):
    env = make(modality="language", num_cards=6, split=split)
    for seed in range(20):
        assert hand_split(env.reset(seed=seed)[1]["numbers"]) == split


def test_check_env_passes_with_eight_cards():
    check_env(make(modality="vision", num_cards=8, render_mode="rgb_array").unwrapped)


def test_large_fixed_hands_must_be_playable():
    env = make(modality="language", num_cards=8)
    _, info = env.reset(options={"cards": ["HA", "S2", "C3", "D4", "H5", "S6", "C7", "D8"]})
    assert info["numbers"] == [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="not playable: no formula making 24 was found within 20,000 search steps"):
        env.reset(options={"cards": ["HA", "SA", "CA", "DA", "HA", "SA", "CA", "DA"]})  # at most (1+1+1)*(1+1+1)*(1+1)


def test_large_hands_refuse_a_target_few_hands_make():
    with pytest.raises(ValueError, match=r"too few hands can make 1000000000: .* choose a target most hands can make"):
        make(modality="language", num_cards=5, target=10**9)


def test_rule_ood_refuses_a_target_only_hands_without_face_cards_make():
    # Only 5 makes 5 with one card, and under "11-12-13" every hand holds a J, Q or K: reset used to loop forever.
    with pytest.raises(ValueError, match="free of J, Q and K"):
        make(modality="language", num_cards=1, face_cards="11-12-13", target=5)


@pytest.mark.parametrize(("face_cards", "target", "rank"), [("10", 6561, 9), ("11-12-13", 28561, 13)])
def test_a_target_only_one_hand_makes_is_dealt_directly(face_cards, target, rank):
    # 9*9*9*9 and 13*13*13*13: a draw would be dealable about once in 28,561 (or 6,591) tries.
    env = make(modality="language", face_cards=face_cards, target=target, suits="mixed")
    hands = [env.reset(seed=seed)[1]["cards"] for seed in range(20)]
    assert all(Card.from_code(code).rank == rank for hand in hands for code in hand)
    assert len({tuple(hand) for hand in hands}) > 1  # the suits still vary
    assert [make(modality="language", face_cards=face_cards, target=target, suits="mixed").reset(seed=seed)[1]["cards"] for seed in range(3)] == hands[:3]

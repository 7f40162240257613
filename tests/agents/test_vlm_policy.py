"""VLMPolicy on tiny Qwen2-VL / Qwen2.5-VL checkpoints: generation, caches and log-prob consistency.

Encoding alone (no model) is tested in ``test_encoder.py``.
"""

import numpy as np
import pytest
import torch

from agents.chat import ChatTurn, Dialogue
from agents.policy import DialogueCache, TokenSequence, VLMPolicy, choose_tokens
from agents.policy.scoring import shared_prefix_length
from agents.responder import Request
from agents.tiny import ARCHITECTURES
from tests.conftest import MAX_PIXELS
from tests.model_hooks import LogitBias


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _prompts(policy):
    """Three prompts of different lengths: two with images of different sizes, one text only."""
    return [
        policy.encode_dialogue(Dialogue.start("Cards on the table. Reach 24.", image=_image(1200, 1200))),
        policy.encode_dialogue(
            Dialogue.start("Text only: you are facing north-east, turn left at the bank.")
        ),
        policy.encode_dialogue(Dialogue.start("Where to?", image=_image(300, 500, seed=1))),
    ]


def test_generated_multi_turn_trajectory_decodes_to_the_rendered_dialogue(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    dialogue = Dialogue.start("Reach 24.", image=_image(200, 300))
    trajectory = policy.encode_dialogue(dialogue)
    torch.manual_seed(0)
    with LogitBias(policy, bias=4.0):
        for message in ("Wrong, try again.", "Still wrong."):
            (generation,) = policy.generate([trajectory], temperature=1.0, max_new_tokens=12)
            trajectory = trajectory.extended(generation.token_ids)
            follow_up = policy.encode_follow_up(message, close_assistant_turn=not generation.finished)
            trajectory = trajectory.extended(follow_up)
            dialogue = dialogue.with_assistant(generation.text).with_user(message)

    image_tokens = trajectory.images.num_image_tokens[0]
    expected_text = policy.render(dialogue, add_generation_prompt=True)
    expected_text = expected_text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens)
    assert policy.decode(trajectory.token_ids) == expected_text


def _requests(prompts, generators=None):
    """One request per prompt, as the rollout engine asks a token responder (the dialogue is not what it reads)."""
    generators = generators or [None] * len(prompts)
    return [
        Request(episode=index, seed=index, member=0, turn=0, dialogue=Dialogue.start("unused"), observation={}, env=None,
                prompt=prompt, generator=generator)
        for index, (prompt, generator) in enumerate(zip(prompts, generators, strict=True))
    ]


def test_the_policys_responder_answers_a_batch_as_generate_does(tiny_policies):
    """The token responder is `generate` with its settings bound: the same tokens and log-probs, a row's draws from its
    own generator whatever shares the batch, and caches kept so a next turn can continue them."""
    policy = tiny_policies["qwen2.5-vl"]
    prompts = _prompts(policy)
    responder = policy.responder(temperature=1.3, max_new_tokens=6)
    assert responder.answers_in_tokens and responder.sampling_temperature == 1.3
    alone = [torch.Generator().manual_seed(5)]
    (by_itself,) = [future.result() for future in responder.respond(_requests(prompts[1:2], alone))]
    generators = [torch.Generator().manual_seed(seed) for seed in (4, 5, 6)]
    answers = [future.result() for future in responder.respond(_requests(prompts, generators))]
    assert answers[1].token_ids == by_itself.token_ids
    assert all(answer.cache is not None for answer in answers)
    generators = [torch.Generator().manual_seed(seed) for seed in (4, 5, 6)]
    direct = policy.generate(prompts, temperature=1.3, max_new_tokens=6, generators=generators)
    assert [answer.token_ids for answer in answers] == [generation.token_ids for generation in direct]
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(answers, direct, strict=True))
    greedy = policy.responder(greedy=True, max_new_tokens=6, keep_cache=False)
    assert greedy.sampling_temperature == 1.0
    assert all(future.result().cache is None for future in greedy.respond(_requests(prompts)))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        policy.responder(temperature=0.0)
    with pytest.raises(ValueError, match="answers token prompts"):
        responder.respond([Request(0, 0, 0, 0, Dialogue.start("Reach 24."), {}, None)])


def test_greedy_generation_is_deterministic_and_picks_the_arg_max(tiny_policies_float64):
    policy = tiny_policies_float64["qwen2-vl"]  # decoding and teacher forcing agree to ~1e-15: no near-tie flips
    prompts = _prompts(policy)
    first = policy.generate(prompts, max_new_tokens=8, greedy=True)
    second = policy.generate(prompts, max_new_tokens=8, greedy=True)
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(first, second, strict=True))

    # Each greedy token is the most likely one: its log-prob is the top teacher-forced log-prob.
    full = [prompt.extended(g.token_ids) for prompt, g in zip(prompts, first, strict=True)]
    batch = policy.collate(full)
    with torch.no_grad():
        logits = policy.model(
            **batch.model_inputs(policy.dtype), position_ids=policy.position_ids(batch), use_cache=False
        ).logits
    for row, (prompt, generation) in enumerate(zip(prompts, first, strict=True)):
        start = batch.pad_lengths[row] + len(prompt) - 1
        allowed = logits[row, start : start + len(generation.token_ids)]
        allowed[:, list(policy.suppressed_token_ids)] = float("-inf")
        predicted = allowed.argmax(-1)
        assert predicted.tolist() == generation.token_ids


def test_sampling_is_reproducible_with_the_torch_seed(tiny_policies):
    policy = tiny_policies["qwen2.5-vl"]
    prompts = _prompts(policy)
    samples = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        samples.append([g.token_ids for g in policy.generate(prompts, temperature=1.3, max_new_tokens=10)])
    assert samples[0] == samples[1]
    assert samples[0] != samples[2]


def test_checkpoint_sampling_defaults_do_not_leak_into_generate(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    # The tiny checkpoint ships Qwen-Instruct-like near-greedy defaults on purpose; top_k=1 would make
    # every sample the arg-max.
    assert policy.checkpoint_generation_config.top_k == 1
    assert policy.checkpoint_generation_config.repetition_penalty == 1.05
    assert policy.model.generation_config.top_k in (None, 50)  # the neutral config: transformers' default
    prompt = _prompts(policy)[1]
    torch.manual_seed(0)
    samples = policy.generate([prompt] * 8, temperature=1.0, max_new_tokens=6)
    assert len({tuple(g.token_ids) for g in samples}) > 1


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_choose_tokens_samples_the_tempered_distribution(temperature):
    logits = torch.tensor([[2.0, 0.5, 9.0, -1.0, 1.0, 0.0]])
    suppressed = torch.tensor([2])
    draws = 40_000
    torch.manual_seed(0)
    chosen, logprobs = choose_tokens(
        logits.expand(draws, -1), suppressed, temperature=temperature, greedy=False
    )
    expected = torch.softmax((logits[0] / temperature).index_fill(0, suppressed, float("-inf")), dim=0)
    frequencies = torch.bincount(chosen, minlength=6).float() / draws
    assert frequencies[2] == 0  # the suppressed token, although it has the largest logit
    assert (frequencies - expected).abs().max() < 0.01
    torch.testing.assert_close(logprobs, expected.log()[chosen])

    greedy, greedy_logprob = choose_tokens(logits, suppressed, temperature=1.0, greedy=True)
    assert greedy.tolist() == [0]
    torch.testing.assert_close(
        greedy_logprob, torch.log_softmax(logits.index_fill(1, suppressed, -torch.inf), 1)[:, 0]
    )


def _next_turn(policy, prompt, generation, message):
    follow_up = policy.encode_follow_up(message, close_assistant_turn=not generation.finished)
    return prompt.extended(generation.token_ids).extended(follow_up)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_turns_match_turns_encoded_from_scratch(tiny_policies_float64, arch):
    policy = tiny_policies_float64[arch]  # greedy tokens of two code paths: compared where rounding cannot flip one
    prompts = _prompts(policy)
    with LogitBias(policy, bias=3.0):
        first = policy.generate(prompts, max_new_tokens=10, greedy=True, keep_cache=True)
        for prompt, generation in zip(prompts, first, strict=True):
            # The prefix holds the prompt and every generated token but the last (never fed back).
            assert generation.cache.token_ids == (*prompt.token_ids, *generation.token_ids[:-1])
            assert generation.cache.layers[0][0].shape[1] == len(generation.cache)
        second = [
            _next_turn(policy, prompt, generation, message)
            for prompt, generation, message in zip(
                prompts, first, ("Wrong numbers.", "You are at the bank now; which way?", "No."), strict=True
            )
        ]
        # Mixed batch: two rows continue from their caches, one restarts, one has none.
        caches = [first[0].cache, first[1].cache, None]
        cached = policy.generate(second, max_new_tokens=10, greedy=True, caches=caches, keep_cache=True)
        fresh = policy.generate(second, max_new_tokens=10, greedy=True)
        full = [prompt.extended(g.token_ids) for prompt, g in zip(second, cached, strict=True)]
        with torch.no_grad():
            scored = policy.token_logprobs(
                full, [range(len(p), len(s)) for p, s in zip(second, full, strict=True)]
            )
    for with_cache, without_cache, teacher_forced in zip(cached, fresh, scored, strict=True):
        assert with_cache.token_ids == without_cache.token_ids
        assert (with_cache.logprobs - without_cache.logprobs).abs().max().item() < 1e-6  # float32-stored log-probs
        assert (with_cache.logprobs - teacher_forced).abs().max().item() < 1e-6


def test_sampled_cached_turns_reproduce_teacher_forced_logprobs(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    prompts = _prompts(policy)
    torch.manual_seed(5)
    with LogitBias(policy, bias=2.0):
        generations = policy.generate(prompts, temperature=0.8, max_new_tokens=12, keep_cache=True)
        for turn in range(2):
            prompts = [
                _next_turn(policy, prompt, generation, f"Try again ({turn}).")
                for prompt, generation in zip(prompts, generations, strict=True)
            ]
            generations = policy.generate(
                prompts,
                temperature=0.8,
                max_new_tokens=12,
                caches=[g.cache for g in generations],
                keep_cache=True,
            )
        full = [prompt.extended(g.token_ids) for prompt, g in zip(prompts, generations, strict=True)]
        with torch.no_grad():
            scored = policy.token_logprobs(
                full, [range(len(p), len(s)) for p, s in zip(prompts, full, strict=True)], temperature=0.8
            )
    for generation, logprobs in zip(generations, scored, strict=True):
        assert (generation.logprobs - logprobs).abs().max().item() < 1e-4


def test_a_cache_that_is_not_a_prefix_is_ignored(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    prompts = _prompts(policy)
    first = policy.generate(prompts, max_new_tokens=4, greedy=True, keep_cache=True)
    # Row 0 gets row 2's cache (other tokens and image), row 1 its own cache but with other images,
    # row 2 a cache as long as the prompt itself (nothing left to feed).
    other_image = TokenSequence(
        prompts[0].token_ids,
        images=policy.encode_dialogue(
            Dialogue.start("Cards on the table. Reach 24.", image=_image(1200, 1200, seed=7))
        ).images,
    )
    stale = [first[2].cache, first[0].cache, first[2].cache]
    assert not first[2].cache.is_continued_by(prompts[0])
    assert not first[0].cache.is_continued_by(other_image.extended(first[0].token_ids))
    same_length = DialogueCache(prompts[2].token_ids, prompts[2].images, first[2].cache.layers, 0)
    assert not same_length.is_continued_by(prompts[2])
    inputs = [prompts[0], other_image.extended(first[0].token_ids), prompts[2]]
    with_stale = policy.generate(inputs, max_new_tokens=6, greedy=True, caches=stale)
    without = policy.generate(inputs, max_new_tokens=6, greedy=True)
    assert [g.token_ids for g in with_stale] == [g.token_ids for g in without]
    with pytest.raises(ValueError, match="caches"):
        policy.generate(prompts, max_new_tokens=2, caches=[None])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("greedy", "temperature"), [(False, 0.8), (True, 1.0)])
def test_teacher_forced_logprobs_reproduce_sampling_logprobs(tiny_policies, arch, greedy, temperature):
    policy = tiny_policies[arch]
    prompts = _prompts(policy)
    assert len({len(prompt) for prompt in prompts}) == len(prompts)  # really padded
    mixed_lengths = False
    for seed in range(4, 24):  # sampling: go on until a batch mixes finished and cut-off responses
        torch.manual_seed(seed)
        with LogitBias(policy, bias=2.5):
            generations = policy.generate(prompts, temperature=temperature, max_new_tokens=16, greedy=greedy)
            full = [prompt.extended(g.token_ids) for prompt, g in zip(prompts, generations, strict=True)]
            targets = [range(len(prompt), len(sequence)) for prompt, sequence in zip(prompts, full, strict=True)]
            with torch.no_grad():
                teacher_forced = policy.token_logprobs(full, targets, temperature=temperature)

        for generation, logprobs in zip(generations, teacher_forced, strict=True):
            assert len(generation.logprobs) == len(generation.token_ids) == len(logprobs)
            assert torch.isfinite(logprobs).all()
            assert (logprobs - generation.logprobs).abs().max().item() < 1e-4
        mixed_lengths = len({len(g.token_ids) for g in generations}) > 1
        if greedy or mixed_lengths:
            break
    assert greedy or mixed_lengths, "no seed gave responses of different lengths"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_decoded_token_is_scored_where_the_models_own_forward_puts_it(tiny_policies, arch):
    """Prefill and the per-token steps put each token at the rope position (multimodal for images) the model's own
    forward over the whole left-padded batch gives it: each generated token's log-prob is the one that forward gives,
    for two rows with images of different sizes and a text-only row decoded together."""
    policy = tiny_policies[arch]
    prompts = _prompts(policy)
    torch.manual_seed(3)
    generations = policy.generate(prompts, temperature=1.0, max_new_tokens=5)
    full = [prompt.extended(g.token_ids) for prompt, g in zip(prompts, generations, strict=True)]
    batch = policy.collate(full)
    positions = policy.position_ids(batch)
    assert not torch.equal(positions[1], positions[2])  # the image rows really have 2D grid positions
    with torch.no_grad():
        logits = policy.model(**batch.model_inputs(policy.dtype), position_ids=positions, use_cache=False).logits
    for row, (prompt, generation) in enumerate(zip(prompts, generations, strict=True)):
        start = batch.pad_lengths[row] + len(prompt) - 1
        scores = logits[row, start : start + len(generation.token_ids)].double()
        scores[:, list(policy.suppressed_token_ids)] = float("-inf")
        expected = torch.log_softmax(scores, dim=-1)[range(len(generation.token_ids)), generation.token_ids]
        assert (expected - generation.logprobs.double()).abs().max().item() < 1e-4


def test_text_only_batches_and_eager_attention_agree(tiny_checkpoints, tiny_policies):
    sdpa = tiny_policies["qwen2-vl"]
    eager = VLMPolicy.from_pretrained(
        tiny_checkpoints["qwen2-vl"], attn_implementation="eager", max_pixels=MAX_PIXELS
    )
    prompts = [
        sdpa.encode_dialogue(Dialogue.start("Go north.")),
        sdpa.encode_dialogue(
            Dialogue((ChatTurn("system", "Be brief."), ChatTurn("user", "Reach 24 with 1 2 3 4 now.")))
        ),
    ]
    generations = sdpa.generate(prompts, max_new_tokens=6, greedy=True)
    full = [prompt.extended(g.token_ids) for prompt, g in zip(prompts, generations, strict=True)]
    targets = [range(len(prompt), len(sequence)) for prompt, sequence in zip(prompts, full, strict=True)]
    with torch.no_grad():
        for policy in (sdpa, eager):
            for generation, logprobs in zip(generations, policy.token_logprobs(full, targets), strict=True):
                assert (logprobs - generation.logprobs).abs().max().item() < 1e-4


def test_bfloat16_policy_generates_and_scores(tiny_checkpoints):
    policy = VLMPolicy.from_pretrained(tiny_checkpoints["qwen2.5-vl"], dtype="bfloat16", max_pixels=MAX_PIXELS)
    assert policy.dtype == torch.bfloat16
    prompts = _prompts(policy)[:2]
    generations = policy.generate(prompts, temperature=1.0, max_new_tokens=4)
    full = [prompt.extended(g.token_ids) for prompt, g in zip(prompts, generations, strict=True)]
    with torch.no_grad():
        scored = policy.token_logprobs(
            full, [range(len(p), len(s)) for p, s in zip(prompts, full, strict=True)]
        )
    for generation, logprobs in zip(generations, scored, strict=True):
        assert logprobs.dtype == torch.float32 and torch.isfinite(logprobs).all()
        # bfloat16 forwards differ between cached decoding and one full pass; only coarse agreement.
        assert (logprobs - generation.logprobs).abs().max().item() < 0.25


def test_token_logprobs_carry_gradients(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    sequence = policy.encode_dialogue(Dialogue.start("Hi", image=_image(100, 100))).extended(
        policy.tokenize("ok")
    )
    (logprobs,) = policy.token_logprobs([sequence], [[len(sequence) - 2, len(sequence) - 1]])
    logprobs.sum().backward()
    assert policy.model.lm_head.weight.grad is not None
    assert policy.model.model.visual.patch_embed.proj.weight.grad.abs().sum() > 0
    policy.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_shared_prefix_gives_the_padded_pass_logprobs_and_gradients(tiny_policies, arch):
    """A batch that shares its first tokens runs them once: same log-probs, entropies and gradients."""
    policy = tiny_policies[arch]
    shared = "Rules of the game, the same for every row, long enough to be worth sharing. "
    answers = ["{'a': 1}", "{'formula': '(10+2)*2=24'} with a longer tail", "ok"]
    sequences, targets = [], []
    for index, answer in enumerate(answers):
        prompt = policy.encode_dialogue(Dialogue.start(shared + f"Hand {index}: {'x' * index}"))
        sequence = prompt.extended(policy.tokenize(answer) + [policy.end_of_turn_token_id])
        sequences.append(sequence)
        targets.append(list(range(len(prompt), len(sequence))))
    assert shared_prefix_length(sequences, targets) >= 16
    results = {}
    for share in (False, True):
        policy.model.zero_grad(set_to_none=True)
        logprobs, entropies = policy.token_logprobs(sequences, targets, with_entropy=True, share_prefix=share)
        (torch.cat(logprobs).sum() + torch.cat(entropies).sum()).backward()
        gradients = {name: p.grad.clone() for name, p in policy.model.named_parameters() if p.grad is not None}
        results[share] = (logprobs, entropies, gradients)
    policy.model.zero_grad(set_to_none=True)
    for padded, shared_result in zip(results[False][0] + results[False][1], results[True][0] + results[True][1], strict=True):
        torch.testing.assert_close(shared_result, padded, atol=1e-4, rtol=0)
    assert results[True][2].keys() == results[False][2].keys()
    for name, gradient in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], gradient, atol=1e-4, rtol=1e-3, msg=name)


def test_prefix_is_not_shared_with_images_a_single_row_or_a_target_inside_it(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    text = "A long common opening that would be shared if nothing else stopped it. "
    rows = [policy.encode_dialogue(Dialogue.start(text + tail)) for tail in ("one", "two")]
    late = [[len(row) - 1] for row in rows]
    assert shared_prefix_length(rows, late) >= 16
    assert shared_prefix_length(rows[:1], late[:1]) == 0
    assert shared_prefix_length(rows, [[3], late[1]]) == 0  # a target needs the logit at position 2
    with_image = policy.encode_dialogue(Dialogue.start(text + "one", image=_image(56, 56)))
    assert shared_prefix_length([with_image, rows[1]], [[len(with_image) - 1], late[1]]) == 0


def test_generation_stops_at_end_of_turn(tiny_policies):
    policy = tiny_policies["qwen2.5-vl"]
    with LogitBias(policy, bias=100.0):
        (generation,) = policy.generate(_prompts(policy)[:1], max_new_tokens=8, greedy=True)
    assert generation.finished
    assert generation.token_ids == [policy.end_of_turn_token_id]
    assert generation.text == ""


def test_vision_placeholders_are_never_generated(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    prompts = _prompts(policy)
    torch.manual_seed(0)
    with LogitBias(policy, bias=100.0, token_id=policy.image_token_id):
        generations = policy.generate(prompts, temperature=1.0, max_new_tokens=6)
        full = [prompt.extended(g.token_ids) for prompt, g in zip(prompts, generations, strict=True)]
        with torch.no_grad():
            scored = policy.token_logprobs(
                full, [range(len(p), len(s)) for p, s in zip(prompts, full, strict=True)]
            )
    assert not any(set(g.token_ids) & set(policy.suppressed_token_ids) for g in generations)
    for generation, logprobs in zip(generations, scored, strict=True):
        assert (logprobs - generation.logprobs).abs().max().item() < 1e-4


def test_invalid_inputs_are_rejected_with_a_clear_message(tiny_policies):
    policy = tiny_policies["qwen2-vl"]
    prompt = policy.encode_dialogue(Dialogue.start("Look.", image=_image(100, 100)))
    with pytest.raises(ValueError, match="image_pad"):
        policy.generate([TokenSequence(prompt.token_ids, images=None)], max_new_tokens=2)
    with pytest.raises(ValueError, match="target positions"):
        policy.token_logprobs([prompt], [[0]])
    with pytest.raises(ValueError, match="temperature"):
        policy.generate([prompt], temperature=0.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="alternate"):
        Dialogue((ChatTurn("assistant", "hi"),))
    with pytest.raises(ValueError, match="dtype"):
        VLMPolicy.from_pretrained("unused", dtype="int8")


def test_chunked_logprobs_and_entropies_equal_one_chunk_with_gradients(tiny_policies, monkeypatch):
    """Log-probs are computed in chunks recomputed in the backward pass; entropies without a graph."""
    from agents.policy import scoring

    policy = tiny_policies["qwen2-vl"]
    sequences = [prompt.extended(policy.tokenize("10*3-6*1=24 then more words")) for prompt in _prompts(policy)]
    targets = [range(len(s) - 12, len(s)) for s in sequences]
    results = {}
    for chunk in (scoring.SCORE_CHUNK, 5):
        monkeypatch.setattr(scoring, "SCORE_CHUNK", chunk)
        logprobs, entropies = policy.token_logprobs(sequences, targets, with_entropy=True, temperature=0.7)
        assert all(not e.requires_grad for e in entropies)
        sum(lp.sum() for lp in logprobs).backward()
        gradient = policy.model.lm_head.weight.grad.clone()
        policy.model.zero_grad(set_to_none=True)
        results[chunk] = (torch.cat(logprobs).detach(), torch.cat(entropies), gradient)
    (a, b) = results.values()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_bf16_autocast_keeps_the_key_value_cache_in_bf16_and_scores_close_to_float32(tiny_checkpoints):
    policy = VLMPolicy.from_pretrained(tiny_checkpoints["qwen2.5-vl"], max_pixels=MAX_PIXELS)
    prompts = _prompts(policy)[:2]
    torch.manual_seed(0)
    reference = policy.generate(prompts, greedy=True, max_new_tokens=4, keep_cache=True)
    policy.autocast_dtype = torch.bfloat16
    generations = policy.generate(prompts, greedy=True, max_new_tokens=4, keep_cache=True)
    keys, values = generations[0].cache.layers[0]
    assert keys.dtype == values.dtype == torch.bfloat16 and policy.dtype == torch.float32  # float32 masters
    for generation, expected in zip(generations, reference, strict=True):
        assert (generation.logprobs - expected.logprobs).abs().max().item() < 0.25  # bf16 compute: coarse agreement


def test_uncached_prompts_run_their_shared_prefix_once(tiny_policies_float64):
    policy = tiny_policies_float64["qwen2-vl"]
    rules = "Reach 24 with the four cards, each used once, with + - * / and parentheses. " * 3
    prompts = [policy.encode_dialogue(Dialogue.start(f"{rules}Your cards: {hand}.")) for hand in ("1 2 3 4", "5 5 5 1", "K Q J A")]
    shared = next(i for i in range(min(len(p) for p in prompts)) if len({p.token_ids[i] for p in prompts}) > 1)
    fed = []
    handle = policy.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        together = policy.generate(prompts, max_new_tokens=6, greedy=True)
    finally:
        handle.remove()
    assert fed[0] == (1, shared)  # the prefix, once
    assert fed[1] == (3, max(len(p) for p in prompts) - shared)  # then each prompt's own tokens
    fed.clear()
    handle = policy.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        alone = policy.generate(prompts, max_new_tokens=6, greedy=True, share_prefix=False)
    finally:
        handle.remove()
    assert fed[0] == (3, max(len(p) for p in prompts))  # without sharing: every prompt whole, in one prefill
    for with_prefix, without in zip(together, alone, strict=True):
        assert with_prefix.token_ids == without.token_ids
        assert torch.allclose(with_prefix.logprobs, without.logprobs, atol=1e-6)  # stored in float32

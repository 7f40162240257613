"""Tiny, randomly initialised Qwen2-VL / Qwen2.5-VL checkpoints built locally, with no network.

`build_tiny_model` writes a directory laid out like a real Hugging Face checkpoint (``config.json``,
``model.safetensors``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
``preprocessor_config.json``), so it loads through exactly the code path a real checkpoint uses:

    >>> from agents.tiny import build_tiny_model
    >>> from agents.policy import VLMPolicy
    >>> path = build_tiny_model("qwen2-vl", "runs/tiny-qwen2-vl", seed=0)
    >>> policy = VLMPolicy.from_pretrained(path)

What is real and what is scaled down:

- The model classes are the real ``Qwen2VLForConditionalGeneration`` and
  ``Qwen2_5_VLForConditionalGeneration``; only the sizes (hidden sizes, depths, heads) are small. The
  vision patch geometry (patch 14, temporal patch 2, spatial merge 2) is Qwen's, so image token counts
  are exactly those of the real models for the same ``min_pixels`` / ``max_pixels``.
- The tokenizer is a byte-level BPE with Qwen2's pre-tokenizer (single digits, byte fallback for any
  text), trained in memory on the environments' own text (`task_corpus`), wrapped in the real
  ``Qwen2Tokenizer``. Its vocabulary is small (``vocab_size`` entries plus the Qwen special tokens
  appended at the end, as in Qwen).
- The chat template renders Qwen's ChatML layout (default system prompt, images as
  ``<|vision_start|><|image_pad|><|vision_end|>``, ``add_generation_prompt``).
- ``generation_config.json`` carries the same kind of sampling defaults as the real Instruct checkpoints
  (``top_k=1``, ``top_p=0.001``, ``temperature=0.1``, ``repetition_penalty=1.05``): a policy that forgets
  to override them samples from the wrong distribution, and the tests notice.

The weights are random, so generations are gibberish; the point is that shapes, special tokens,
image-token expansion, rope positions and the loading path are those of the real models.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2 import Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from amft_vlm.run.safe_io import (
    load_json_text,
    output_directory,
    output_file_target,
    read_regular_text,
    replace_with_file,
)

logger = logging.getLogger(__name__)

ARCHITECTURES = ("qwen2-vl", "qwen2.5-vl")
"""Architectures `build_tiny_model` can build."""

QWEN_ROPE_THETA = 1_000_000.0
"""Rotary base of the Qwen2-VL and Qwen2.5-VL language models (the tiny models' default)."""

TINY_PREFIX = "tiny:"
"""Model specs ``tiny:ARCH`` (e.g. ``tiny:qwen2-vl``) name a tiny model to build instead of a checkpoint."""

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Qwen2-VL's special tokens, in Qwen's order; they get the ids right after the BPE vocabulary."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen's ChatML layout. Written with string expressions (not literal template text) so that every
# newline is explicit and Jinja's whitespace control cannot eat one.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
"""Jinja chat template of the tiny checkpoints (same rendered text as Qwen2-VL-Instruct's template)."""

# Qwen2's split rule: English contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, other whitespace. Single digits keep arithmetic tokenisation regular.
_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS_SETTINGS = (
    ("GeneralPoints-v0", {"modality": "language"}, 60),
    ("GeneralPoints-v0", {"modality": "language", "face_cards": "11-12-13"}, 20),
    ("GeneralPoints-v0", {"modality": "vision", "resolution": 64}, 20),
    ("VIRL-v0", {"modality": "language"}, 12),
    ("VIRL-v0", {"modality": "vision", "resolution": 64}, 4),
)
"""(environment, keyword arguments, episodes) whose text trains the tiny tokenizer."""


@functools.cache
def task_corpus() -> tuple[str, ...]:
    """The tiny tokenizer's training text: what the two environments say and what agents answer them.

    Episodes of GeneralPoints-v0 (language and vision prompts, both face-card rules) and VIRL-v0
    (language and vision) from fixed seeds: every prompt, the expert's answers, a format-only or
    random answer and the feedback it gets, plus Qwen's default system prompt. So the tokenizer
    compresses the task text the way a real Qwen tokenizer does its training data (a GeneralPoints
    prompt is about 250 tokens with 1024 entries and 350 with 512, where a corpus without the prompts
    left 384, mostly single letters) and the same text always gives the same tokenizer. Computed once
    per process (a few seconds).
    """
    import gymnasium as gym

    import environments  # noqa: F401  (registers the environments)
    from agents.baselines import ExpertAgent, GeneralPointsFormatAgent, RandomTextAgent

    texts = [DEFAULT_SYSTEM_PROMPT]
    expert = ExpertAgent()
    for env_id, kwargs, episodes in _CORPUS_SETTINGS:
        env = gym.make(env_id, **kwargs)
        wrong = GeneralPointsFormatAgent(seed=0) if env_id == "GeneralPoints-v0" else RandomTextAgent(seed=0, max_length=40)
        for seed in range(episodes):
            observation, _ = env.reset(seed=seed)
            texts.append(observation["text"])
            done, answers = False, 0
            while not done and answers < 40:
                agent = wrong if answers == 0 else expert
                answer = agent.act(observation, env)
                observation, _, terminated, truncated, _ = env.step(answer)
                done, answers = terminated or truncated, answers + 1
                texts += [answer, observation["text"]]
        env.close()
    return tuple(texts)


def build_tokenizer(*, vocab_size: int = 512) -> Qwen2Tokenizer:
    """Train a byte-level BPE on `task_corpus` and wrap it in the real ``Qwen2Tokenizer``.

    Args:
        vocab_size: size of the trained BPE vocabulary (256 bytes plus merges), before the Qwen special
            tokens are appended.

    Returns:
        A ``Qwen2Tokenizer`` with Qwen's special tokens (pad and unk ``<|endoftext|>``, eos
        ``<|im_end|>`` as in the Instruct checkpoints) and `QWEN_CHAT_TEMPLATE`.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols; got {vocab_size}")
    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(task_corpus(), trainer=trainer)
    model_state = json.loads(bpe.to_str())["model"]
    merges = [
        tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model_state["merges"]
    ]
    vocab = dict(model_state["vocab"])
    # As in Qwen, the special tokens take the ids right after the BPE vocabulary, in Qwen's order.
    vocab.update(
        {token: len(model_state["vocab"]) + index for index, token in enumerate(QWEN_SPECIAL_TOKENS)}
    )
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        errors="replace",
        model_max_length=32768,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    missing = [token for token in QWEN_SPECIAL_TOKENS if tokenizer.convert_tokens_to_ids(token) is None]
    if missing:
        raise RuntimeError(f"tiny tokenizer lacks Qwen special tokens {missing}")
    return tokenizer


def build_image_processor(*, min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's PIL image processor with Qwen's patch geometry and the given pixel budget.

    Args:
        min_pixels: smallest resized image area (pixels); Qwen2-VL's own default is ``56 * 56``.
        max_pixels: largest resized image area (pixels); Qwen2-VL's own default is ``28 * 28 * 1280``.
    """
    return Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )


def _special_token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    return {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}


def build_tiny_config(
    arch: str,
    tokenizer: Qwen2Tokenizer,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_embed_dim: int = 32,
    vision_depth: int = 2,
    vision_num_heads: int = 2,
    initializer_range: float = 0.2,
    rope_theta: float = QWEN_ROPE_THETA,
) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    """The real architecture config of `arch`, scaled down, with special-token ids read from `tokenizer`.

    See `build_tiny_model` for the size arguments.

    The multimodal rope section is ``[t, h, w]`` halves of the head dimension split like Qwen's
    ``[16, 24, 24]`` for head dim 128 (a quarter for time, three eighths each for height and width).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}; got {arch!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}) and num_heads by "
            f"num_kv_heads ({num_kv_heads})"
        )
    head_dim = hidden_size // num_heads
    if head_dim % 8:
        raise ValueError(f"head dim hidden_size/num_heads must be a multiple of 8 for mrope; got {head_dim}")
    rotary_half = head_dim // 2
    mrope_section = [
        rotary_half // 4,
        3 * rotary_half // 8,
        rotary_half - rotary_half // 4 - 3 * rotary_half // 8,
    ]
    ids = _special_token_ids(tokenizer)
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "initializer_range": initializer_range,
    }
    token_ids = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    if arch == "qwen2-vl":
        vision_config = {
            "depth": vision_depth,
            "embed_dim": vision_embed_dim,
            "hidden_size": hidden_size,
            "mlp_ratio": 2,
            "num_heads": vision_num_heads,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": initializer_range,
        }
        return Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **token_ids)
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_embed_dim,
        "intermediate_size": 2 * vision_embed_dim,
        "num_heads": vision_num_heads,
        "out_hidden_size": hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        # The last block attends over the whole image, the others inside windows, as in Qwen2.5-VL.
        "fullatt_block_indexes": [vision_depth - 1],
        "tokens_per_second": 2,
        "initializer_range": initializer_range,
    }
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **token_ids)


def checkpoint_generation_config(tokenizer: Qwen2Tokenizer) -> GenerationConfig:
    """The ``generation_config.json`` of the tiny checkpoints, shaped like Qwen2-VL-Instruct's.

    It deliberately carries the Instruct checkpoints' near-greedy sampling defaults; `VLMPolicy`
    replaces them with explicit settings.
    """
    ids = _special_token_ids(tokenizer)
    return GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        do_sample=True,
        temperature=0.1,
        top_k=1,
        top_p=0.001,
        repetition_penalty=1.05,
    )


def build_tiny_model(
    arch: str = "qwen2-vl",
    output_dir: str | Path = "runs/tiny-qwen2-vl",
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_embed_dim: int = 32,
    vision_depth: int = 2,
    vision_num_heads: int = 2,
    initializer_range: float = 0.2,
    rope_theta: float = QWEN_ROPE_THETA,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 64,
) -> Path:
    """Build a tiny random Qwen-VL checkpoint and save it to `output_dir`.

    Args:
        arch: ``"qwen2-vl"`` (``Qwen2VLForConditionalGeneration``) or ``"qwen2.5-vl"``
            (``Qwen2_5_VLForConditionalGeneration``).
        output_dir: directory to write; created if missing (a symlink to one is followed). The model is saved beside
            it first and its files then replace those of the same name there, as any output (`amft_vlm.run.safe_io`: a
            symlink is written through; a FIFO, socket, device or directory is refused before any file is replaced).
        seed: seed of the weight initialisation; the same seed gives identical weights.
        vocab_size: trained BPE vocabulary size (the model's vocabulary adds the 14 special tokens).
        hidden_size: text hidden size (also the vision merger's output size).
        num_layers: text decoder layers.
        num_heads: text attention heads; ``hidden_size / num_heads`` must be a multiple of 8.
        num_kv_heads: text key/value heads (grouped-query attention as in Qwen).
        intermediate_size: text MLP size.
        vision_embed_dim: vision tower width.
        vision_depth: vision tower blocks.
        vision_num_heads: vision attention heads.
        initializer_range: standard deviation of the random weights. Ten times Qwen's 0.02, so that
            next-token distributions are peaked like a trained model's instead of near-uniform; then a
            wrong position id or attention mask changes log-probs by whole nats, not by 1e-4.
        rope_theta: rotary base of the text model; Qwen2-VL's and Qwen2.5-VL's is ``1e6``. A model trained
            from scratch on dialogues of a few hundred tokens learns position-based copying faster with
            ``1e4`` (the demo uses it).
        min_pixels: image processor's default smallest image area.
        max_pixels: image processor's default largest image area (small, so tests stay fast; real
            Qwen2-VL uses ``28 * 28 * 1280``).

    Returns:
        The checkpoint directory, loadable with ``VLMPolicy.from_pretrained`` or any
        ``AutoModelForImageTextToText`` / ``AutoTokenizer`` / ``AutoImageProcessor`` call.
    """
    output_path = Path(output_dir)
    directory = output_directory(output_path)
    tokenizer = build_tokenizer(vocab_size=vocab_size)
    config = build_tiny_config(
        arch,
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vision_embed_dim=vision_embed_dim,
        vision_depth=vision_depth,
        vision_num_heads=vision_num_heads,
        initializer_range=initializer_range,
        rope_theta=rope_theta,
    )
    model_class = (
        Qwen2VLForConditionalGeneration if arch == "qwen2-vl" else Qwen2_5_VLForConditionalGeneration
    )
    # A forked RNG keeps initialisation deterministic without disturbing the caller's global torch seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config = checkpoint_generation_config(tokenizer)
    # Saved beside the directory, then moved in: Hugging Face's save_pretrained opens each file itself, and would
    # block on a FIFO or write into a device found at one of its names.
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".build"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        build_image_processor(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(staging)
        saved = sorted(staging.iterdir())
        for file in saved:
            output_file_target(directory / file.name)
        for file in saved:
            replace_with_file(file, directory / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    parameter_count = sum(parameter.numel() for parameter in model.parameters())
    logger.info("built tiny %s (%d parameters, seed %d) in %s", arch, parameter_count, seed, output_path)
    return output_path


TINY_MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "preprocessor_config.json",
)  # fmt: skip
"""Files of a `build_tiny_model` directory that loading it needs."""

_SAVED_SUFFIXES = (".json", ".jinja", ".safetensors", ".txt", ".tmp")
"""Suffixes of the files a model save writes (``.tmp``: a file it had not finished), so of a tiny model's directory."""


def resolve_model_spec(spec: str, tiny_dir: str | Path, *, seed: int = 0) -> str:
    """The path or Hub id to load for a model spec, building a tiny model first for ``tiny:ARCH``.

    A spec that does not start with `TINY_PREFIX` (a checkpoint directory or a Hub id) is returned
    as it is. ``tiny:qwen2-vl`` / ``tiny:qwen2.5-vl`` builds that tiny model with ``seed`` in
    `tiny_dir` unless a complete one is already there, and returns `tiny_dir`.

    The build goes to ``.NAME.tmp`` beside `tiny_dir` and is renamed into place when complete, so a
    process killed part-way leaves no half-built model, only that directory, removed by the next call.
    A `tiny_dir` left incomplete by an older version (a file missing, empty or cut short) is built again
    with a warning; one that also holds files a tiny model does not have is left alone (ValueError).
    """
    if not spec.startswith(TINY_PREFIX):
        return spec
    arch = spec[len(TINY_PREFIX) :]
    if arch not in ARCHITECTURES:
        raise ValueError(f"a tiny model spec is tiny:ARCH with ARCH one of {ARCHITECTURES}; got {spec!r}")
    path = output_directory(tiny_dir, create=False)  # a symlink's target is built; a FIFO, device or file refused
    staging = path.with_name(f".{path.name}.tmp")
    if staging.exists():
        logger.info("removing %s, left by a tiny-model build that was stopped", staging)
        shutil.rmtree(staging)
    if path.is_dir() and any(path.iterdir()):
        problem = tiny_model_problem(path)
        if problem is None:
            return str(path)
        foreign = sorted(item.name for item in path.iterdir() if not item.is_file() or item.suffix not in _SAVED_SUFFIXES)
        if foreign:
            raise ValueError(
                f"{path} is an incomplete model ({problem}) and also holds {', '.join(foreign)}, which a tiny model "
                "does not; move those away or delete the directory, and it is built again"
            )
        logger.warning("%s is an incomplete tiny model (%s; a build stopped part-way?): building it again", path, problem)
        shutil.rmtree(path)
    build_tiny_model(arch, staging, seed=seed)
    os.replace(staging, path)  # replaces an empty directory too
    return str(path)


def tiny_model_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete tiny model (a file missing, empty or cut short), or None when it is.

    Reads the JSON files and the safetensors header only; no weights are loaded.
    """
    from safetensors import SafetensorError, safe_open

    for name in TINY_MODEL_FILES:
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        try:
            if file.suffix == ".json":  # Hugging Face's files: Infinity may be one of their values
                load_json_text(read_regular_text(file, 256 * 2**20, what="a model's JSON file"), allow_nonfinite=True)
            else:
                with safe_open(str(file), framework="pt"):
                    pass
        except (OSError, ValueError, SafetensorError) as error:  # ValueError: JSON and UTF-8 decoding
            why = "empty" if file.stat().st_size == 0 else f"damaged ({error})"
            return f"{name} is {why}"
    return None

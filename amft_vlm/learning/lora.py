"""Optional LoRA training of the policy's language model, through ``peft`` when it is installed.

What is adapted. `apply_lora` wraps the attention and MLP projections of every decoder layer of the
*language* model (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
``down_proj`` by default) with low-rank adapters, ``W x + (alpha / rank) * B A x``, and freezes every
other weight. The vision tower, the vision merger, the embeddings, the norms and ``lm_head`` are not
adapted: the agent tasks change what the model says about an image far more than how it sees it, and
the frozen tower keeps the image features of the expert data and of the rollouts the same. The
projections are picked by module name, ``...layers.N.self_attn.*`` / ``...layers.N.mlp.*`` outside
``visual``, which is the language model in both Qwen2-VL and Qwen2.5-VL (Qwen2.5-VL's vision blocks
also have ``gate_proj`` / ``up_proj`` / ``down_proj``; they live under ``visual.blocks`` and are
skipped).

Defaults. ``alpha = 2 * rank`` unless given (so the update scale ``alpha / rank`` is 2 whatever the
rank; peft's own default would be ``alpha = 8`` for every rank), dropout 0, ``B`` initialised to zero
and ``A`` Kaiming-uniform (peft's default), so a fresh adapter leaves the model's outputs unchanged.
``A`` is drawn from torch's global generator: seed it before `apply_lora` for a reproducible start.
Adapter weights are kept in float32 even when the base model is bf16/fp16 (as ``peft.get_peft_model``
does), so small updates are not rounded away. Dropout acts only in ``train()`` mode; `VLMPolicy` keeps
its model in ``eval()`` mode, so with the default of 0 rollouts and teacher-forced log-probs agree.

The model object stays the same. The adapters are injected in place with
``peft.inject_adapter_in_model``: ``policy.model`` is still the Hugging Face
``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``, so
``policy.model.model.get_rope_index``, ``policy.model(...)``, `VLMPolicy.generate` and
`VLMPolicy.token_logprobs` work unchanged, with the adapters in the forward pass.

Gradients. Only the LoRA weights require grad after `apply_lora`; it returns them (and
`lora_parameters` returns them again) in a fixed order, the order of ``named_parameters``. Pass exactly
that list to the optimiser and to ``torch.autograd.grad``; the same list, in the same order, comes
back from `load_lora` on a fresh copy of the base model, so an optimiser state saved against it
restores exactly.

Saving. A model with unmerged adapters must not be saved with ``save_pretrained`` (its weights carry
``base_layer`` names that ``from_pretrained`` does not load): checkpoint the adapters with `save_lora`
(``adapter.safetensors`` plus ``lora_config.json`` naming the base model) and rebuild with
``VLMPolicy.from_pretrained(base)`` + `load_lora`; export a plain checkpoint with `merge_lora` then
``save_policy``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from amft_vlm.run.safe_io import (
    atomic_output,
    load_json_text,
    output_directory,
    output_file_target,
    read_regular_text,
    write_text_atomic,
)

if TYPE_CHECKING:
    from agents.policy import VLMPolicy

ADAPTER_FILE = "adapter.safetensors"
"""File name of the adapter weights written by `save_lora`."""

CONFIG_FILE = "lora_config.json"
"""File name of the `LoraSettings` written by `save_lora`."""

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Projections of each language-model decoder layer that get adapters by default."""

ADAPTER_NAME = "default"
"""The peft adapter name; a policy carries one adapter."""

# A projection inside a decoder layer of the language model: ``model.language_model.layers.N.mlp.up_proj``
# (current transformers) or ``model.layers.N.self_attn.q_proj`` (older Qwen2-VL layouts). The vision
# tower has ``blocks``, not ``layers``, and names under ``visual`` are excluded besides.
_LANGUAGE_PROJECTION = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn|mlp)\.(?P<projection>\w+)$")


@dataclass(frozen=True)
class LoraSettings:
    """The adapter layout of a policy, as written to ``lora_config.json`` by `save_lora`.

    Attributes:
        rank: rank ``r`` of each ``B A`` update.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
        dropout: dropout on the adapter input (active in ``train()`` mode only).
        target_modules: short names of the adapted projections (e.g. ``q_proj``).
        base_model: path or hub id of the base model the adapters belong to, or None when unknown.
    """

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    base_model: str | None = None


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            "LoRA training needs the peft package: pip install peft (or pip install 'amft-vlm[lora]')"
        ) from error
    return peft


def _lora_layer_class() -> type:
    _require_peft()
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def _adapted_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The (name, module) pairs of the LoRA layers of `model`, in module order."""
    lora_layer = _lora_layer_class()
    return [(name, module) for name, module in model.named_modules() if isinstance(module, lora_layer)]


def has_lora(policy: VLMPolicy) -> bool:
    """Whether ``policy.model`` carries LoRA adapters (False too when peft is not installed)."""
    try:
        return bool(_adapted_modules(policy.model))
    except ImportError:
        return False


def target_module_names(
    policy: VLMPolicy, target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGETS
) -> list[str]:
    """Full names of the language-model projections `apply_lora` would adapt, in module order.

    Raises:
        ValueError: when a name in `target_modules` is no linear projection of the language model's
            decoder layers.
    """
    names, found_projections, available = [], set(), set()
    for name, module in policy.model.named_modules():
        match = _LANGUAGE_PROJECTION.search(name)
        if match is None or not isinstance(module, torch.nn.Linear) or "visual" in name.split("."):
            continue
        available.add(match["projection"])
        if match["projection"] in target_modules:
            names.append(name)
            found_projections.add(match["projection"])
    unknown = [target for target in target_modules if target not in found_projections]
    if unknown or not target_modules:
        raise ValueError(
            f"target_modules must name linear projections of the language model's decoder layers, "
            f"some of {sorted(available)}; got {list(target_modules)}"
        )
    return names


def apply_lora(
    policy: VLMPolicy,
    *,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
) -> list[torch.nn.Parameter]:
    """Inject LoRA adapters into the language model of ``policy.model`` in place and freeze the rest.

    Args:
        policy: a `VLMPolicy` (anything with a Qwen-VL ``.model``) without adapters yet.
        rank: rank of each adapter, at least 1.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``. None means ``2 * rank``.
        dropout: dropout probability on the adapter input, in ``[0, 1)``; acts in ``train()`` mode only.
        target_modules: short names of the decoder-layer projections to adapt (see `DEFAULT_TARGETS`).

    Returns:
        The trainable LoRA parameters in a fixed order (see `lora_parameters`).

    Raises:
        ImportError: when peft is not installed.
        ValueError: for ``rank < 1``, a dropout outside ``[0, 1)``, an unknown target, or a policy that
            already has adapters.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1; got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1); got {dropout}")
    peft = _require_peft()
    if _adapted_modules(policy.model):
        raise ValueError("policy.model already has LoRA adapters; load a fresh base model to apply new ones")
    names = target_module_names(policy, tuple(target_modules))
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=dropout,
        # Full module names, matched exactly: no suffix rule can catch a vision-tower projection.
        target_modules=names,
        bias="none",
    )
    model = peft.inject_adapter_in_model(config, policy.model, adapter_name=ADAPTER_NAME)
    if model is not policy.model:
        raise RuntimeError("peft.inject_adapter_in_model returned a new model; expected in-place injection")
    # New modules start in training mode; without this, adapter dropout would act on a model that
    # `VLMPolicy` put in eval mode, and sampling and teacher-forced log-probs would disagree.
    for _, module in _adapted_modules(policy.model):
        module.train(policy.model.training)
    parameters = lora_parameters(policy)
    adapter_ids = {id(parameter) for parameter in parameters}
    with torch.no_grad():
        for parameter in policy.model.parameters():
            parameter.requires_grad_(id(parameter) in adapter_ids)
        for parameter in parameters:
            # Replacing .data keeps the Parameter objects (and any references to them) valid.
            parameter.data = parameter.data.float()
    return parameters


def _lora_named_parameters(policy: VLMPolicy) -> list[tuple[str, torch.nn.Parameter]]:
    adapted = {name for name, _ in _adapted_modules(policy.model)}
    if not adapted:
        raise ValueError("policy.model has no LoRA adapters; call apply_lora or load_lora first")
    named = []
    for name, parameter in policy.model.named_parameters():
        module_name, _, rest = name.partition(".lora_")
        if rest and module_name in adapted:
            named.append((name, parameter))
    return named


def lora_parameters(policy: VLMPolicy) -> list[torch.nn.Parameter]:
    """The LoRA weights of ``policy.model`` in ``named_parameters`` order: the list to optimise.

    The order depends only on the architecture and the targets, so a model rebuilt by `load_lora` gives
    the same list, and an optimiser state saved against one restores onto the other.
    """
    return [parameter for _, parameter in _lora_named_parameters(policy)]


def lora_settings(policy: VLMPolicy, *, base_model: str | None = None) -> LoraSettings:
    """The `LoraSettings` of the adapters in ``policy.model``.

    Args:
        base_model: the base model's path or hub id to record; None reads ``policy.model.name_or_path``.
    """
    adapted = _adapted_modules(policy.model)
    if not adapted:
        raise ValueError("policy.model has no LoRA adapters; call apply_lora or load_lora first")
    _, first = adapted[0]
    rank = first.r[ADAPTER_NAME]
    dropout_module = first.lora_dropout[ADAPTER_NAME]
    targets = tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in adapted))
    if base_model is None:
        base_model = getattr(policy.model, "name_or_path", None) or None
    return LoraSettings(
        rank=rank,
        alpha=first.lora_alpha[ADAPTER_NAME],
        dropout=dropout_module.p if isinstance(dropout_module, torch.nn.Dropout) else 0.0,
        target_modules=targets,
        base_model=base_model,
    )


def lora_state_dict(policy: VLMPolicy) -> dict[str, torch.Tensor]:
    """A copy of the LoRA weights of ``policy.model``, keyed by parameter name, in `lora_parameters` order."""
    return {name: parameter.detach().clone() for name, parameter in _lora_named_parameters(policy)}


def load_lora_state_dict(policy: VLMPolicy, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `lora_state_dict`) into the LoRA weights of ``policy.model``, strictly.

    Raises:
        ValueError: when `state` misses a LoRA weight of the model, has a key the model lacks, or a
            tensor of the wrong shape; the message names them all. Nothing is copied then.
    """
    named = dict(_lora_named_parameters(policy))
    missing = [name for name in named if name not in state]
    unexpected = [name for name in state if name not in named]
    wrong_shape = [
        f"{name}: {tuple(state[name].shape)} != {tuple(parameter.shape)}"
        for name, parameter in named.items()
        if name in state and state[name].shape != parameter.shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            "LoRA state dict does not match the model's adapters (same rank and targets needed): "
            f"missing keys {missing}, unexpected keys {unexpected}, wrong shapes {wrong_shape}"
        )
    with torch.no_grad():
        for name, parameter in named.items():
            parameter.copy_(state[name])


def save_lora(policy: VLMPolicy, directory: str | Path, *, base_model: str | None = None) -> Path:
    """Write the adapters of ``policy.model`` to `directory`: ``adapter.safetensors`` and ``lora_config.json``.

    Args:
        directory: created if needed; existing adapter files are replaced, each whole or not at all, as any output
            (`amft_vlm.run.safe_io`: a symlink is written through; a FIFO, socket, device or directory is refused).
        base_model: the base model's path or hub id to record; None reads ``policy.model.name_or_path``.

    Returns:
        `directory` as a Path.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    output_directory(directory)
    for name in (ADAPTER_FILE, CONFIG_FILE):
        output_file_target(directory / name)  # both refused before either is written
    settings = lora_settings(policy, base_model=base_model)
    with atomic_output(directory / ADAPTER_FILE) as staging:
        save_file({name: tensor.contiguous() for name, tensor in lora_state_dict(policy).items()}, staging)
    record = asdict(settings) | {"target_modules": list(settings.target_modules)}
    write_text_atomic(directory / CONFIG_FILE, json.dumps(record, indent=2) + "\n")
    return directory


def read_lora_settings(directory: str | Path) -> LoraSettings:
    """The `LoraSettings` saved by `save_lora` in `directory` (e.g. to find the base model to load).

    Raises:
        FileNotFoundError: `directory` has no ``lora_config.json``.
        ValueError: it is not a regular file (`amft_vlm.run.safe_io.InputFileError`), or not the settings `save_lora` writes.
    """
    path = Path(directory) / CONFIG_FILE
    try:
        text = read_regular_text(path, 2**20, what="a LoRA config")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: is {directory} a directory written by save_lora?") from None
    try:
        record = load_json_text(text)
        return LoraSettings(**(record | {"target_modules": tuple(record["target_modules"])}))
    except (ValueError, TypeError, KeyError) as error:  # TypeError: not an object, or other fields than LoraSettings'
        raise ValueError(f"{path} is not the LoRA settings save_lora writes ({error}); save the adapters again") from None


def load_lora(policy: VLMPolicy, directory: str | Path) -> list[torch.nn.Parameter]:
    """Restore adapters saved by `save_lora` into ``policy`` (its base model) and return `lora_parameters`.

    A policy without adapters gets them first (`apply_lora` with the saved settings); one that has them
    must have the same rank, alpha, dropout and targets. The weights are then copied exactly.

    Raises:
        ValueError: when the policy's adapters differ from the saved ones, or the weights do not match.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    settings = read_lora_settings(directory)
    if has_lora(policy):
        current = lora_settings(policy, base_model=settings.base_model)
        if current != settings:
            raise ValueError(
                f"policy's adapters {current} differ from the saved ones {settings} in {directory}"
            )
    else:
        apply_lora(
            policy,
            rank=settings.rank,
            alpha=settings.alpha,
            dropout=settings.dropout,
            target_modules=settings.target_modules,
        )
    load_lora_state_dict(policy, load_file(directory / ADAPTER_FILE))
    return lora_parameters(policy)


def merge_lora(policy: VLMPolicy) -> None:
    """Fold the adapters into the base weights of ``policy.model`` and remove them, in place.

    Afterwards ``policy.model`` is a plain Hugging Face model with the same outputs (up to float
    rounding in the base dtype): ``save_policy`` writes a checkpoint that ``VLMPolicy.from_pretrained``
    loads like any other. The weights stay frozen (``requires_grad=False``). Training cannot continue
    on the adapters after this, so merge at export time, or on a separately loaded copy.
    """
    adapted = _adapted_modules(policy.model)
    if not adapted:
        raise ValueError("policy.model has no LoRA adapters to merge")
    for name, module in adapted:
        module.merge(safe_merge=True)
        parent_name, _, child_name = name.rpartition(".")
        parent = policy.model.get_submodule(parent_name) if parent_name else policy.model
        setattr(parent, child_name, module.get_base_layer())
    # inject_adapter_in_model leaves the adapter config on the model; a plain model has none.
    if hasattr(policy.model, "peft_config"):
        del policy.model.peft_config


def load_policy(path: str | Path, **kwargs: Any) -> VLMPolicy:
    """`VLMPolicy.from_pretrained` that also takes a directory written by `save_lora`.

    Such a directory (a LoRA training checkpoint's ``lora/``) loads its base model, applies the saved
    adapters and merges them, giving a plain policy with the trained weights. Any other path or Hub id
    goes to `VLMPolicy.from_pretrained` unchanged. `kwargs` go to `VLMPolicy.from_pretrained`.
    """
    from agents.policy import VLMPolicy

    if (Path(path) / CONFIG_FILE).is_file():
        settings = read_lora_settings(path)
        policy = VLMPolicy.from_pretrained(settings.base_model, **kwargs)
        load_lora(policy, path)
        merge_lora(policy)
        return policy
    return VLMPolicy.from_pretrained(path, **kwargs)

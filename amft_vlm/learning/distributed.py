"""Everything that crosses processes: the data-parallel strategy, reductions and shard-local dot products.

Strategies (`amft_vlm.run.config.TrainConfig.distributed`):

- ``none``: one process, plain tensors.
- ``ddp``: every process holds the whole model and gradients are summed across processes in each
  backward pass. It is built with FSDP2's `fully_shard` on a (replicate = N, shard = 1) device mesh
  (HSDP with one shard per replica): DDP's semantics through torch's composable API, which keeps the
  model the same object (`VLMPolicy` keeps calling it) and lets every forward have its own shapes.
- ``fsdp2``: parameters, gradients and AdamW state sharded over the processes: `fully_shard` on every
  decoder layer and vision block, then on the whole model; a layer's weights are gathered for its
  forward and backward and freed after.
- ``auto``: ``none`` for one process; with several, ``fsdp2`` when accelerate is configured for FSDP
  and ``ddp`` otherwise.

accelerate launches the processes (``accelerate launch``, or ``torchrun``) and keeps the trackers; its
own FSDP and DDP wrappers are not used: they would hide the model from `VLMPolicy`, and accelerate's
FSDP plugin does not switch on without GPUs, where the tests run.

Three rules keep the processes in step, since each layer's gather and reduction is a collective:

- every pass *with gradients* makes the same number of forward and backward calls on every process:
  the trainer needs batches that split evenly (`Parallel.check_even`), skips a validation start state
  only when it ties on every process, and turns the policy's shared-prefix shortcut off (it makes one
  or two forward calls depending on the batch);
- forwards *without* gradients (rollouts, validation episodes, critic features, the entropy probe) run
  inside `Parallel.full_weights`, every layer gathered once, so processes may generate different lengths;
- gradients are summed, not averaged: the losses are already divided by the global token count.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from amft_vlm.run.config import ControllerUse, TrainConfig

STRATEGIES = ("auto", "none", "ddp", "fsdp2")
"""Values of `TrainConfig.distributed`."""
DIGEST_SLICES = 2
"""32-bit slices of `Parallel.digest` (16 hex digits)."""
GLOO_RELEASE_SECONDS = 0.2
"""How long `Parallel.close` leaves the GIL to gloo's worker threads to drop the last collectives' buffers."""


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _shard_group(tensors: Iterable[torch.Tensor | None]) -> Any | None:
    """The process group over which the first DTensor among `tensors` is sharded (None: no sharded DTensor)."""
    for tensor in tensors:
        if tensor is not None and hasattr(tensor, "device_mesh"):
            for dim, placement in enumerate(tensor.placements):
                if placement.is_shard() and tensor.device_mesh.size(dim) > 1:
                    return tensor.device_mesh.get_group(dim)
            return None
    return None


def flat_dots(pairs: Sequence[tuple[Sequence[torch.Tensor | None], Sequence[torch.Tensor | None]]]) -> list[float]:
    """For each pair of tensor lists, the sum of elementwise products over matching tensors (None counts as 0).

    Accumulated in float64 without float64 copies of the inputs; DTensors contribute their local shards
    and the shard-local sums are added over the shard group in one all-reduce. The host reads all the
    totals at once (one synchronisation for every pair).
    """
    totals, group = [], None
    for a, b in pairs:
        total = None
        for x, y in zip(a, b, strict=True):
            if x is not None and y is not None:
                part = torch.sum(local_shard(x) * local_shard(y), dtype=torch.float64)
                total = part if total is None else total + part
        totals.append(total)
        group = group or _shard_group([*a, *b])
    device = next((t.device for t in totals if t is not None), torch.device("cpu"))
    if not totals:
        return []
    stacked = torch.stack([torch.zeros((), dtype=torch.float64, device=device) if t is None else t for t in totals])
    if group is not None:
        dist.all_reduce(stacked, group=group)
    return stacked.tolist()


def flat_dot(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """`flat_dots` of one pair."""
    return flat_dots([(a, b)])[0]


class Parallel:
    """The data-parallel strategy of one training run and the operations that cross its processes.

    Args:
        strategy: one of `STRATEGIES`.
        accelerator: the run's accelerate ``Accelerator`` (process count, rank, device, scalar reductions).
    """

    def __init__(self, strategy: str, accelerator: Any) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"distributed must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        if strategy == "auto":
            fsdp = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)) == "FSDP"
            strategy = "none" if self.world == 1 else "fsdp2" if fsdp else "ddp"
        if strategy == "none" and self.world > 1:
            raise ValueError(f"distributed: none runs one process, but {self.world} were launched; use ddp or fsdp2")
        if strategy != "none" and self.world == 1:
            raise ValueError(
                f"distributed: {strategy} needs several processes; launch with `torchrun --nproc_per_node N -m amft_vlm.cli "
                "train ...` or `accelerate launch --config_file configs/accelerate/... -m amft_vlm.cli train ...`"
            )
        self.strategy = strategy
        self._modules: list[Any] = []
        self._root: Any = None
        self._gathered = False

    @property
    def sharded(self) -> bool:
        """True when the model's parameters are DTensors (``ddp`` or ``fsdp2``)."""
        return self.strategy != "none"

    def check_even(self, **counts: int) -> None:
        """Refuse batch sizes that do not split evenly over the processes (each pass with gradients must
        make the same calls on every process)."""
        if not self.sharded:
            return
        for name, count in counts.items():
            if count % self.world:
                raise ValueError(
                    f"{name} ({count}) must be a multiple of the process count ({self.world}) with distributed: "
                    f"{self.strategy}: every process runs the same forward and backward calls"
                )

    def wrap(self, model: torch.nn.Module) -> None:
        """Apply the strategy to `model` in place (its parameters become DTensors); a no-op for ``none``.

        Build the optimiser after this: the parameters are new objects.
        """
        if not self.sharded:
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not all(hasattr(FSDPModule, name) for name in ("set_force_sum_reduction_for_comms", "set_gradient_divide_factor", "unshard")):
            raise RuntimeError(f"distributed: {self.strategy} needs FSDP2 with summed reductions (torch 2.9 or newer); this is torch {torch.__version__}")

        device_type = self.accelerator.device.type
        if self.strategy == "fsdp2":
            mesh = init_device_mesh(device_type, (self.world,), mesh_dim_names=("shard",))
        else:
            mesh = init_device_mesh(device_type, (self.world, 1), mesh_dim_names=("replicate", "shard"))
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self._root = model
        self._modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
        for module in self._modules:
            module.set_gradient_divide_factor(1.0)  # a sum: the losses are divided by the global token count
            module.set_force_sum_reduction_for_comms(True)

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Every layer's weights gathered for the block, which runs without gradients: forwards inside make
        no collective calls, so processes may run different numbers of them (generation). Re-entrant."""
        if not self._modules or self._gathered:
            with torch.no_grad():
                yield
            return
        self._gathered = True
        try:
            for module in self._modules:
                module.set_reshard_after_forward(False)
                module.unshard()
            with torch.no_grad():
                yield
        finally:
            for module in self._modules:
                module.reshard()
                module.set_reshard_after_forward(True)
            self._root.set_reshard_after_forward(False, recurse=False)  # fully_shard's default for the root
            self._gathered = False

    def sums(self, values: Sequence[float]) -> list[float]:
        """Each value summed over all processes, in one reduction."""
        if self.world == 1:
            return [float(v) for v in values]
        packed = torch.tensor(list(values), dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(packed, reduction="sum").tolist()

    def digest(self, items: Sequence[str]) -> str:
        """A short hash of the multiset of every process's `items`: the same whichever process holds which
        item, in any order (e.g. the token digests of a step's episodes, played on one process or several).

        Each item's hash is cut into 32-bit slices whose sums are reduced over the processes; float64 adds
        them exactly up to 2**21 items.
        """
        slices = [0.0] * DIGEST_SLICES
        for item in items:
            value = int.from_bytes(hashlib.blake2b(item.encode(), digest_size=4 * DIGEST_SLICES).digest(), "big")
            for index in range(DIGEST_SLICES):
                slices[index] += (value >> (32 * index)) & 0xFFFFFFFF
        return "".join(f"{int(total) % 2**32:08x}" for total in self.sums(slices))

    def check_same(self, value: float, *, what: str) -> None:
        """Raise if `value` differs between processes (a quantity every process must agree on, like mu)."""
        if self.world == 1:
            return
        values = self.accelerator.gather(torch.tensor([value], dtype=torch.float64, device=self.accelerator.device))
        if not torch.all(values == values[0]):
            raise RuntimeError(f"{what} differs across processes ({values.tolist()}); its inputs must be reduced over all processes")

    def sum_gradients(self, module: torch.nn.Module) -> None:
        """Sum the gradients of a small replicated module (the ppo critic) over the processes (a missing one counts as 0)."""
        if self.world == 1:
            return
        for parameter in module.parameters():
            gradient = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            parameter.grad = self.accelerator.reduce(gradient, reduction="sum")

    def close(self) -> None:
        """End the run's processes: finish accelerate's trackers and tear the process group down.

        Work-around, not a fix: with several processes, every process first meets at a barrier and then sleeps
        briefly with the GIL released. Gloo's worker threads drop a finished collective's buffers just after it
        completes (a barrier keeps the collectives before it until it is dropped), and dropping a tensor Python
        has seen takes the GIL; one still doing so when the interpreter shuts down aborts the process
        ("terminate called without an active exception", 1 run in 8 of the two-process tests before this
        pause). The last save ends with a collective, so without the pause a finished run could end so.
        """
        if self.world > 1:
            self.accelerator.wait_for_everyone()
            time.sleep(GLOO_RELEASE_SECONDS)
        self.accelerator.end_training()

    def all_true(self, flags: Sequence[bool]) -> list[bool]:
        """Per position, whether the flag is true on every process (all processes pass as many flags)."""
        if self.world == 1:
            return [bool(flag) for flag in flags]
        totals = self.sums([float(bool(flag)) for flag in flags])
        return [total == self.world for total in totals]


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of the language model and the blocks of the vision tower (each its own FSDP unit)."""
    inner = getattr(model, "model", model)
    language = getattr(inner, "language_model", inner)
    blocks = list(getattr(language, "layers", []))
    visual = getattr(inner, "visual", None)
    if visual is not None:
        blocks += list(getattr(visual, "blocks", []))
    if not blocks:
        raise ValueError(f"found no decoder layers in {type(model).__name__}; fully_shard needs a Qwen-VL-family model")
    return blocks


MIN_ROUNDS = 3
"""Fewest rounds of validation start states (one per process) the standardized meta signal takes its error over."""


def check_training_layout(config: TrainConfig, controller_use: ControllerUse | None, parallel: Parallel) -> None:
    """Batches of `config` that split evenly over the processes, and what the sharded strategies do not support yet;
    `controller_use` is the method's (`amft_vlm.learning.methods.Method.controller`). A ValueError says what to change."""

    if not parallel.sharded:
        return
    if config.lora_rank:
        raise ValueError(
            f"LoRA trains on one process for now (distributed: {parallel.strategy} was chosen for "
            f"{parallel.world} processes); launch one process, or train all weights"
        )
    use = controller_use
    counts = {"sft_batch_size": config.sft_batch_size, "episodes_per_step": config.episodes_per_step}
    if use is not None:
        counts["controller.validation_states"] = config.controller.validation_states
    parallel.check_even(**counts)
    rounds = config.controller.validation_states // parallel.world
    if use is not None and use.meta and config.controller.meta_signal == "standardized" and rounds < MIN_ROUNDS:
        raise ValueError(
            f"controller.validation_states ({config.controller.validation_states}) gives {rounds} round(s) of one start state "
            f"per process on {parallel.world} processes; the standardized meta signal takes its standard error over "
            f"rounds and needs at least {MIN_ROUNDS}: set validation_states to {MIN_ROUNDS * parallel.world} or more, "
            "or controller.meta_signal: raw"
        )

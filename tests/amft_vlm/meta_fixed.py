"""``python -m tests.amft_vlm.meta_fixed MODEL STRATEGY OUT``: the meta-gradient of fixed episodes along a fixed direction.

Run under torchrun by ``tests/amft_vlm/learning/test_meta.py``: every process loads the same weights (float64), plays
the same model-free answers (`ANSWERS`) on the vowel bandit, takes its share of the start states and
measures dU/dmu with `amft_vlm.learning.meta.meta_gradient` along a direction drawn from a fixed seed. Nothing is
sampled, so one process and several must agree to rounding. The main process writes the measurement to OUT
as JSON.
"""

from __future__ import annotations

import json
import sys

import torch
from accelerate import Accelerator

from agents.base import Agent
from amft_vlm.learning.controller import MetaEstimate
from amft_vlm.learning.distributed import Parallel
from amft_vlm.learning.meta import meta_gradient
from amft_vlm.learning.training_setup import load_training_policy
from amft_vlm.rollout.engine import RolloutEngine
from amft_vlm.run.config import load_config
from tests.amft_vlm import bandit

ANSWERS = (
    ("aeiou", "bcdfg", "ab", "eeb"),
    ("xyz", "xyz", "xyz", "xyz"),  # a state whose episodes tie: no information
    ("a", "bb", "ae", "abcd"),
    ("ouch", "oui", "tsk", "aie"),
)
"""Each start state's answers (its four episodes, in order): varied rewards, and one tied state."""
SAMPLES = len(ANSWERS[0])


class ScriptedAgent(Agent):
    """Answers with `ANSWERS` in order, one answer per episode (the bandit has one turn)."""

    name = "scripted"

    def __init__(self) -> None:
        self.answers = iter(answer for state in ANSWERS for answer in state)

    def act(self, observation: dict, env) -> str:
        return next(self.answers)


def fixed_episodes(policy) -> list:
    """Every start state's episodes, the same on every process (one environment, in queue order)."""
    engine = RolloutEngine(policy, bandit.ENV_ID, env_kwargs={}, num_envs=1)
    trajectories, _ = engine.collect(range(len(ANSWERS)), group_size=SAMPLES, responder=ScriptedAgent(), progress=False)
    return trajectories


def fixed_direction(parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    """A standard normal tensor per parameter, from one seed, laid out (sharded or replicated) like the parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    generator = torch.Generator().manual_seed(1234)
    direction = []
    for parameter in parameters:
        full = torch.randn(tuple(parameter.shape), generator=generator, dtype=torch.float64)
        if isinstance(parameter, DTensor):
            full = distribute_tensor(full, parameter.device_mesh, parameter.placements)
        direction.append(full)
    return direction


def main(model: str, strategy: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)
    parallel = Parallel(strategy, accelerator)
    config = load_config(overrides=[f"model={model}", "dtype=float64", f"distributed={strategy}", "device=cpu"])
    policy, parameters = load_training_policy(config, model, parallel, device="cpu")
    with parallel.full_weights():
        episodes = fixed_episodes(policy)
    mine = [t for t in episodes if t.group % parallel.world == parallel.rank]
    measurement = meta_gradient(policy, parameters, parallel, mine, fixed_direction(parameters), temperature=1.0, micro_batch_count=2)
    estimate = MetaEstimate.from_per_state(measurement.values)
    if accelerator.is_main_process:
        record = {"values": measurement.values, "value": estimate.value, "states": measurement.states, "tied_states": measurement.tied_states}
        with open(out, "w") as handle:
            json.dump(record, handle)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])

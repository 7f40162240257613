"""amft-vlm: train and benchmark vision-language model agents with AMFT and the methods it is compared with.

The package is grouped by stage; each floor imports only the floors below it:

- `amft_vlm.run`: the run's plumbing (configuration, run directory, safe I/O, worker processes, preflight);
- `amft_vlm.rollout`: the episode loop for every responder, trajectories, expert and SFT data;
- `amft_vlm.learning`: methods, advantages, objectives, the optimiser step, the controller, checkpoints, the trainer;
- `amft_vlm.evaluation`: metrics, evaluation records and tables, served models, reports;
- on top: `amft_vlm.compare`, `amft_vlm.demo` and `amft_vlm.cli`, which use every stage.

Importing it registers the environments (``GeneralPoints-v0``, ``VIRL-v0``) with Gymnasium. The modules that
lived directly under ``amft_vlm`` before the stages became folders (``amft_vlm.config``, ``amft_vlm.rollout``'s
engine, ``amft_vlm.evaluate``, ...) still import, as the same module objects, with a `FutureWarning` naming
where each one lives now.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

import environments  # noqa: F401  (registers the environments)

__version__ = "0.1.0"

MOVED_MODULES = {
    "amft_vlm.advantages": "amft_vlm.learning.advantages",
    "amft_vlm.batch": "amft_vlm.learning.batch",
    "amft_vlm.budget": "amft_vlm.run.budget",
    "amft_vlm.checkpoint": "amft_vlm.learning.checkpoint",
    "amft_vlm.collection": "amft_vlm.learning.collection",
    "amft_vlm.config": "amft_vlm.run.config",
    "amft_vlm.controller": "amft_vlm.learning.controller",
    "amft_vlm.critic": "amft_vlm.learning.critic",
    "amft_vlm.distributed": "amft_vlm.learning.distributed",
    "amft_vlm.episode_metrics": "amft_vlm.rollout.episode_metrics",
    "amft_vlm.evaluate": "amft_vlm.evaluation.evaluate",
    "amft_vlm.expert_data": "amft_vlm.rollout.expert_data",
    "amft_vlm.expert_format": "amft_vlm.run.expert_format",
    "amft_vlm.jobs": "amft_vlm.run.jobs",
    "amft_vlm.lora": "amft_vlm.learning.lora",
    "amft_vlm.losses": "amft_vlm.learning.losses",
    "amft_vlm.meta": "amft_vlm.learning.meta",
    "amft_vlm.methods": "amft_vlm.learning.methods",
    "amft_vlm.objectives": "amft_vlm.learning.objectives",
    "amft_vlm.optimiser": "amft_vlm.learning.optimiser",
    "amft_vlm.peers": "amft_vlm.learning.peers",
    "amft_vlm.preflight": "amft_vlm.run.preflight",
    "amft_vlm.report": "amft_vlm.evaluation.report",
    "amft_vlm.resolve": "amft_vlm.learning.resolve",
    "amft_vlm.resume": "amft_vlm.learning.resume",
    "amft_vlm.run_directory": "amft_vlm.run.run_directory",
    "amft_vlm.safe_io": "amft_vlm.run.safe_io",
    "amft_vlm.safe_pickle": "amft_vlm.run.safe_pickle",
    "amft_vlm.served": "amft_vlm.evaluation.served",
    "amft_vlm.sft_data": "amft_vlm.rollout.sft_data",
    "amft_vlm.trainer": "amft_vlm.learning.trainer",
    "amft_vlm.training_setup": "amft_vlm.learning.training_setup",
    "amft_vlm.trajectory": "amft_vlm.rollout.trajectory",
}
"""Old module path -> where the module lives now (the flat layout before the stages became folders)."""


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module that moved, so ``import amft_vlm.config`` and
    ``amft_vlm.config.TrainConfig`` keep working; the two names are the same module object."""

    @staticmethod
    def new_name(fullname: str) -> str | None:
        """Where `fullname` lives now (a moved module, or a module inside a moved package), or None."""
        old = fullname
        while old not in MOVED_MODULES:
            old, _, _ = old.rpartition(".")
            if not old:
                return None
        return MOVED_MODULES[old] + fullname[len(old) :]

    def find_spec(self, fullname, path=None, target=None):
        if self.new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = self.new_name(spec.name)
        warnings.warn(f"{spec.name} moved to {new}; import it from there", FutureWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        """The module ran when it was imported under its new name."""


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())

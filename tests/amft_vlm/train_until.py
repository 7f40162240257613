"""``python -m tests.amft_vlm.train_until [--stop-after N] [--resume] key=value ...``: train, optionally stopping
after N steps with a checkpoint (as a kill right after one would); run under torchrun by the distributed tests."""

import sys

from amft_vlm.learning.trainer import Trainer
from amft_vlm.run.config import load_config


def main(argv: list[str]) -> None:
    stop = next((int(arg.split("=", 1)[1]) for arg in argv if arg.startswith("--stop-after=")), None)
    overrides = [arg for arg in argv if not arg.startswith("--")]
    trainer = Trainer(load_config(overrides=overrides), resume="--resume" in argv, progress=False)
    trainer.train(stop_after=stop)  # the schedule keeps the full length; the last step run is checkpointed
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1:])

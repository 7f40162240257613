"""Save the street-view grids of one VIRL-v0 route as PNG files, to look at what a model sees.

Usage: ``python scripts/render_virl_views.py [--city builtin|builtin-ood] [--data-dir DIR] [--route N]
[--resolution PX] [--out DIR]``. Writes one PNG per decision point (``point_00_start.png``, ...)
and prints the route's instructions and each point's expected action.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import gymnasium as gym
from PIL import Image

import environments  # noqa: F401  (registers VIRL-v0)

log = logging.getLogger("render_virl_views")


def main(argv: list[str] | None = None) -> None:
    """Walk a route with the oracle expert and save the view grid of every point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--city", default="builtin", choices=("builtin", "builtin-ood"))
    parser.add_argument("--data-dir", default=None, help="a published V-IRL route database instead of a built-in city")
    parser.add_argument("--route", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=448)
    parser.add_argument("--out", type=Path, default=Path("virl_views"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    kwargs = {"data_dir": args.data_dir} if args.data_dir else {"city": args.city}
    env = gym.make("VIRL-v0", modality="vision", resolution=args.resolution, **kwargs)
    obs, info = env.reset(seed=0, options={"route": args.route})
    args.out.mkdir(parents=True, exist_ok=True)
    log.info("route %s\n%s", info["route_id"], env.unwrapped.rail.instruction_text)
    while True:
        point = env.unwrapped.rail.points[info["point_index"]]
        path = args.out / f"point_{info['point_index']:02d}_{point.kind}.png"
        Image.fromarray(obs["image"]).save(path)
        log.info("%s: %s -> %s", path, point.observation, info["expected_action"])
        obs, _, terminated, truncated, info = env.step(env.unwrapped.expert_response())
        if terminated or truncated:
            break


if __name__ == "__main__":
    main()

"""The GPU check script's stages, on a tiny model and the CPU (the real check needs a CUDA machine)."""

import json

from scripts.gpu_check import main


def test_gpu_check_runs_every_stage_on_a_tiny_model(tmp_path, capsys):
    assert main(["--size", "tiny", "--device", "cpu", "--max-new-tokens", "6", "--out", str(tmp_path)]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for rollout in ("rollout", "rollout_trainer_precision"):
        assert figures[rollout]["tokens_per_second"] > 0 and figures[rollout]["episodes"] == 16
    for method in ("sft", "rl", "amft"):
        assert figures[method]["step_seconds"] > 0, method
    assert figures["amft"]["meta_dU_dmu"] is not None  # the meta-gradient scored validation episodes

"""Time to result for K=3 checkpoints: one sweep (decode once, compile once) against 3 separate
``fasteval eval`` commands, each a subprocess, as a user would run them (default settings).

    pytest benchmarks/bench_sweep.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

K = 3


@pytest.fixture(scope="session")
def sweep_checkpoints(bench_dataset, tmp_path_factory) -> list[str]:
    """K ResNet-18s sized to the bench dataset (random weights, different seeds)."""
    import torchvision

    from fasteval.data.samples import discover

    classes = discover(bench_dataset, quiet=True).num_classes
    folder = tmp_path_factory.mktemp("sweep")
    paths = []
    for seed in range(K):
        torch.manual_seed(seed)
        paths.append(str(folder / f"ckpt{seed}.pt"))
        torch.save(torchvision.models.resnet18(num_classes=classes).state_dict(), paths[-1])
    return paths


def _fasteval(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fasteval", "eval", *args, "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})


@pytest.mark.parametrize("variant", ["separate", "sweep"])
def bench_sweep_cpu(benchmark, variant, bench_dataset, sweep_checkpoints, extra=()):
    """``separate``: K commands, one per checkpoint; ``sweep``: one command with every checkpoint.
    Both run after a first command has filled the compile cache (a user's second day)."""
    args = [bench_dataset, "--device", "cpu", *extra]
    _fasteval(*args, "--weights", sweep_checkpoints[0])  # warm the compile cache for both variants

    def separate():
        for path in sweep_checkpoints:
            _fasteval(*args, "--weights", path)

    def sweep():
        _fasteval(*args, "--weights", *sweep_checkpoints)

    benchmark.group = f"{len(sweep_checkpoints)} checkpoints, time to result (cpu)"
    benchmark.extra_info["checkpoints"] = len(sweep_checkpoints)
    benchmark.pedantic(separate if variant == "separate" else sweep, rounds=1, iterations=1)

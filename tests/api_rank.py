"""One torchrun rank calling the Python API (tests/test_api.py only): ``fasteval.evaluate`` with no process group
(the library makes its own and removes it), then in a gloo group the script made (left as it was), ``compare``,
a rank holding other weights, and ``sweep`` (refused under torchrun). Writes ``OUT/rank<N>.json``.

Run as ``torchrun --nproc-per-node 2 tests/api_rank.py DATA OUT``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

import fasteval
from fasteval.errors import FastevalError
from test_api import TRANSFORMS, TinyNet


def figures(result) -> dict:
    return {"top1": result.correct_top1, "top5": result.correct_top5, "samples": result.samples, "loss": result.loss,
            "predictions": result.run.predictions.tolist(), "per_rank": result.run.extra["distributed"]["samples_per_rank"]}


def main() -> None:
    data, out = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    transform = TRANSFORMS["v1 bilinear, no crop"]
    model = TinyNet(4)
    run = dict(transform=transform, batch_size=4, workers=0, progress=False, compile="off", device="cpu")
    found = {"own_group": figures(fasteval.evaluate(model, data, **run)),
             "initialised_after_own": dist.is_initialized(),
             "own_group_again": figures(fasteval.evaluate(model, data, **run))}  # a group made again
    dist.init_process_group("gloo")
    found["script_group"] = figures(fasteval.evaluate(model, data, **run))
    found["reference"] = figures(fasteval.evaluate(model, data, reference=True, **run))
    both = fasteval.compare(model, data, **run)
    found["compare"] = {"flipped": both["validation"]["flipped"], "fast": figures(both["fast"])}
    other = TinyNet(4)
    if rank == 1:
        with torch.no_grad():
            other.head[-1].bias.add_(1.0)
    try:
        fasteval.evaluate(other, data, **run)
        found["other_weights"] = None
    except FastevalError as exc:
        found["other_weights"] = str(exc)
    try:
        fasteval.sweep([model, model], data, **run)
        found["sweep"] = None
    except FastevalError as exc:
        found["sweep"] = str(exc)
    found["initialised_after_script"] = dist.is_initialized()
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(found, f)


if __name__ == "__main__":
    main()

"""One torchrun rank of ``fasteval``, with a fault injected on one rank (tests/test_distributed.py only).

``FASTEVAL_TEST_FAULT``: ``exit`` (the process dies without a word during the fast evaluation),
``kill`` (it is killed there by SIGKILL, as by ``kill -9``), ``stall`` (it hangs there) or ``data`` (the
rank evaluates the folder ``FASTEVAL_TEST_OTHER_DATA`` instead of DATA: another copy of the dataset), on rank
``FASTEVAL_TEST_FAULT_RANK`` (default 1). ``FASTEVAL_TEST_BUSY_S``: every other rank works (sleeps, in no
collective) that many seconds as its fast evaluation starts. Run as ``torchrun ... tests/distributed_rank.py eval DATA ...``.
"""

import os
import signal
import sys
import time

from fasteval import cli
from fasteval.evaluation import fast


def inject(fault: str) -> None:
    if fault == "data":
        data = next(i for i, arg in enumerate(sys.argv) if arg == "eval") + 1
        sys.argv[data] = os.environ["FASTEVAL_TEST_OTHER_DATA"]
        return
    original = fast.FastEvaluator.run

    def run(self, progress=True):
        if fault == "exit":
            os._exit(3)
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "busy":
            time.sleep(float(os.environ["FASTEVAL_TEST_BUSY_S"]))
        if fault == "stall":
            time.sleep(3600)
        return original(self, progress)

    fast.FastEvaluator.run = run


if os.environ["RANK"] == os.environ.get("FASTEVAL_TEST_FAULT_RANK", "1"):
    inject(os.environ["FASTEVAL_TEST_FAULT"])
elif os.environ.get("FASTEVAL_TEST_BUSY_S"):
    inject("busy")
sys.exit(cli.main(sys.argv[1:]))

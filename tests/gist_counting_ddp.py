"""`gist ARGS` under torchrun, recording in $GIST_DDP_COUNTS/rank<R> how many DistributedDataParallel
wrappers are alive when rank R leaves the process group (tests/test_distributed.py). It must be 0: a
DDP Reducer that outlives the group frees it holding the GIL, which deadlocked gist train at exit."""

import gc
import os
import sys
from pathlib import Path

from torch.nn.parallel import DistributedDataParallel

import cli
from pipeline import guide

leave_distributed = guide.leave_distributed


def counting_leave_distributed(world_size: int) -> None:
    alive = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
    (Path(os.environ["GIST_DDP_COUNTS"]) / f"rank{os.environ['RANK']}").write_text(str(alive))
    leave_distributed(world_size)


guide.leave_distributed = counting_leave_distributed
sys.argv = ["gist", *sys.argv[1:]]
cli.main()

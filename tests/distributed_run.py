"""`dtengine distill` for tests that launch it under torchrun (and plain python, for the 1-rank side).

    python tests/distributed_run.py [--freeze-batchnorm] [--fail-on-rank R] [--sigterm-on-rank R]
                                    [distill arguments: key=value, --resume]

--freeze-batchnorm: BatchNorm layers use their running statistics (as in eval mode) while training, so that the
gradient of a batch split over ranks equals that of the whole batch (each rank's own batch statistics would
differ). --fail-on-rank R: that rank raises at its second step (a crash mid-run). --sigterm-on-rank R: that rank
alone receives SIGTERM during its second step (a scheduler preempting one process).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from torch import nn

from dtengine.cli import main
from dtengine.distill import Distiller

parser = argparse.ArgumentParser()
parser.add_argument("--freeze-batchnorm", action="store_true")
parser.add_argument("--fail-on-rank", type=int, default=-1)
parser.add_argument("--sigterm-on-rank", type=int, default=-1)
args, distill_args = parser.parse_known_args()

if args.freeze_batchnorm:
    plain_train = Distiller.train

    def train_with_frozen_batchnorm(self, mode: bool = True):
        plain_train(self, mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    Distiller.train = train_with_frozen_batchnorm

if args.fail_on_rank == int(os.environ.get("RANK", "0")):
    plain_forward = Distiller.forward

    def crash_at_step_one(self, images, step=None, first_index=0):
        if step == 1:
            raise RuntimeError(f"rank {args.fail_on_rank} failed on purpose at step 1")
        return plain_forward(self, images, step, first_index)

    Distiller.forward = crash_at_step_one

if args.sigterm_on_rank == int(os.environ.get("RANK", "0")):
    plain_forward = Distiller.forward

    def sigterm_at_step_one(self, images, step=None, first_index=0):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return plain_forward(self, images, step, first_index)

    Distiller.forward = sigterm_at_step_one

sys.exit(main(["distill", *distill_args]))

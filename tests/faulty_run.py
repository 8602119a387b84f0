"""`dtengine` with faults injected at exact points, for the subprocess tests of test_faults.py.

Environment variables (global step numbers, 0-based: the step being computed):
    FAULT_KILL_AT_STEP=N        SIGKILL in the middle of step N's forward pass
    FAULT_SIGNAL_AT_STEP=N:SIG  send SIG (TERM or INT) to this process during step N, as a scheduler would;
                                N:SIG:2 sends it twice
    FAULT_KILL_IN_SAVE=1        SIGKILL halfway through writing the first checkpoint file of this process
    FAULT_SLOW_SAVE_S=S         a checkpoint save after the injected signal first sleeps S seconds (a hung disk)
    FAULT_NAN_TEACHER_AT=A,B    the teacher's features are NaN at these steps ("all": every step)

Then it runs `dtengine.cli.main` with the command-line arguments.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def install_faults() -> None:
    from dtengine.distill import Distiller
    from dtengine.runtime import checkpoint, io
    from dtengine.train import run_checkpoint

    forward = Distiller.forward
    teacher_targets = Distiller.teacher_targets
    kill_at = int(os.environ.get("FAULT_KILL_AT_STEP", -1))
    signal_at = os.environ.get("FAULT_SIGNAL_AT_STEP", "")
    nan_at = os.environ.get("FAULT_NAN_TEACHER_AT", "")
    signalled = []

    def faulty_forward(self, images, step=None, first_index=0):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if signal_at and step == int(signal_at.split(":")[0]):
            _, name, *times = signal_at.split(":")
            signalled.append(name)
            for _ in range(int(times[0]) if times else 1):
                os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
                time.sleep(0.05)  # let the handler run between the two
        self._fault_step = step
        return forward(self, images, step=step, first_index=first_index)

    def faulty_teacher_targets(self, *args, **kwargs):
        targets = teacher_targets(self, *args, **kwargs)
        step = getattr(self, "_fault_step", None)
        if nan_at == "all" or (nan_at and str(step) in nan_at.split(",")):
            targets.features[0].fill_(float("nan"))
        return targets

    Distiller.forward = faulty_forward
    Distiller.teacher_targets = faulty_teacher_targets

    if os.environ.get("FAULT_KILL_IN_SAVE"):

        def torn_write(path, content):
            with io.atomic_open(path) as handle:
                content(handle)
                handle.truncate(handle.tell() // 2)
                handle.flush()
                os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.atomic_write = torn_write

    slow = float(os.environ.get("FAULT_SLOW_SAVE_S", 0))
    if slow:
        save_run = run_checkpoint.save_run

        def slow_save_run(*args, **kwargs):
            if signalled:
                time.sleep(slow)
            return save_run(*args, **kwargs)

        import dtengine.train.distillation as distillation

        distillation.save_run = slow_save_run


if __name__ == "__main__":
    install_faults()
    from dtengine.cli import main

    sys.exit(main(sys.argv[1:]))

"""Stopping a run cleanly: signals (preemption, Ctrl-C) and non-finite values.

Signals. Schedulers send SIGTERM before they preempt; Ctrl-C sends SIGINT. The first one asks the loop to stop:
it finishes the step in flight, writes a checkpoint, and exits non-zero (128 + the signal: 143 for SIGTERM, 130
for SIGINT) with the exact command that resumes, because a stopped run is not a finished one and torchrun, SLURM
and Kubernetes must not count it as success. If that takes longer than `train.stop_grace_s`, the process exits
anyway (checkpoints are written atomically, so nothing is left half-written). A second signal exits at once.
Under torchrun the ranks agree on the stop at each step boundary (a max over a gloo group of the host, not the
GPU), so no rank is left waiting in a collective.

Non-finite values. `NonFiniteGuard` keeps device-side flags of every step's losses, teacher features and gradient
norm, and masks the update of a step that has any non-finite value (fused AdamW's `found_inf`: parameters and
optimizer state stay untouched), so there is no host sync per step. The loop reads the flags when it logs or
saves. `train.on_nonfinite=stop` ends the run with an error naming the first bad step and what went non-finite;
`skip` drops such steps (BatchNorm running statistics included), counts them, and stops after
`train.max_nonfinite_in_a_row` in a row.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dtengine.runtime.errors import DTEngineError

NONFINITE_POLICIES = ("stop", "skip")


class RunStopped(Exception):
    """The run stopped on a signal after writing a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteError(DTEngineError):
    """Training produced a non-finite value (and the policy says stop)."""


class StopRequest:
    """The first SIGTERM / SIGINT asks for a stop; the second exits at once (see the module docstring)."""

    def __init__(self, grace_s: float, distributed: bool):
        self.grace_s, self.signum, self._previous, self._group = grace_s, None, {}, None
        if distributed:
            self._group = dist.new_group(backend="gloo")  # host-side: agreeing never waits for the GPU

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second signal: now
            os._exit(128 + signum)
        self.signum = signum
        # The grace period: if finishing the step and saving hangs, leave anyway.
        watchdog = threading.Timer(self.grace_s, os._exit, args=(128 + signum,))
        watchdog.daemon = True
        watchdog.start()

    def agreed(self) -> int | None:
        """The signal any rank received (None: keep going); a collective under torchrun."""
        if self._group is None:
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag) or None


class NonFiniteGuard:
    """Device-side flags of non-finite steps (see the module docstring).

    Args:
        term_names: the loss terms checked, in order.
        device: where the flags live.
    """

    def __init__(self, term_names: tuple[str, ...], device: torch.device):
        self.term_names = term_names
        self.bad_terms = torch.zeros(len(term_names) + 2, dtype=torch.bool, device=device)  # teacher, terms, gradients
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        self.max_in_a_row = torch.zeros((), dtype=torch.int64, device=device)

    def step_finite(self, losses: list[dict[str, Tensor]], teacher_finite: Tensor, grad_norm: Tensor) -> Tensor:
        """Whether the step is finite (a 0-dim bool on the device), from its micro-batches' losses, its teacher
        features and its gradient norm; records what was not."""
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor; the full norm (a collective, not a host sync)
            grad_norm = grad_norm.full_tensor()
        per_term = [torch.stack([micro[name].isfinite() for micro in losses]).all() for name in self.term_names]
        checks = torch.stack([teacher_finite, *per_term, grad_norm.isfinite()])  # in causal order
        finite = checks.all()
        self.bad_terms |= ~checks
        return finite

    def record(self, finite: Tensor, step: int) -> None:
        bad = (~finite).long()
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~finite, step, self.first_bad_step)
        self.bad_steps += bad
        self.in_a_row = (self.in_a_row + bad) * bad
        self.max_in_a_row = torch.maximum(self.max_in_a_row, self.in_a_row)

    def buffers_before(self, module: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """The floating-point buffers of `module` (BatchNorm running statistics) and copies of them, taken before a
        step: a forward pass that overflows updates them even though its update is masked."""
        return [(buffer, buffer.clone()) for buffer in module.buffers() if buffer.is_floating_point()]

    @staticmethod
    def restore_buffers(saved: list[tuple[Tensor, Tensor]], finite: Tensor) -> None:
        """Put back the buffers of a non-finite step (on the device, no sync)."""
        for buffer, before in saved:
            buffer.copy_(torch.where(finite, buffer, before))

    def report(self, reduce=None) -> dict:
        """The flags on the host (a sync: only at logging and saving boundaries); `reduce` (a max over ranks)
        makes every rank take the same decision."""
        counts = torch.stack([self.bad_steps, self.max_in_a_row, self.first_bad_step])
        flags = self.bad_terms.long()
        if reduce is not None:
            counts, flags = reduce(counts), reduce(flags)
        bad_steps, max_in_a_row, first_bad_step = counts.tolist()
        bad_terms = flags.bool().tolist()
        names = ["teacher features", *self.term_names, "gradients"]
        return {
            "bad_steps": bad_steps,
            "max_in_a_row": max_in_a_row,
            "first_bad_step": first_bad_step,
            "what": [name for name, bad in zip(names, bad_terms) if bad],
        }

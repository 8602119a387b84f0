"""dtkernels: Triton kernels for dtengine (installed under the import name `dtkernels`).

Kernels import only torch and triton, never `dtengine`: the engine imports them. Each op follows
kernel -> launcher -> custom_op / autograd -> thin wrapper, with the pure-PyTorch reference living in
`dtengine.ops` as the CPU path and the test oracle.

    feature_loss/   fused whitening + MSE + attention transfer, forward with d loss / d r
    attention/      flash-style attention, forward and backward
    interpreter.py  the one check of whether kernels run on the GPU or in Triton's interpreter
    aot.py          ahead-of-time compile for sm_80 / sm_90 without a GPU (tests and reports)
"""

__all__: list[str] = []

"""dtkernels: Triton kernels for dtengine (installed under the import name `dtkernels`).

Kernels import only torch and triton, never `dtengine`: the engine imports them. Each op follows
kernel -> launcher -> custom_op / autograd -> thin wrapper, with the pure-PyTorch reference living in
`dtengine.ops` as the CPU path and the test oracle. The fused feature-regression loss and attention kernels
land here in later issues; this package is the scaffolding their tests and AOT checks plug into.
"""

__all__: list[str] = []

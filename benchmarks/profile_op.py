"""One forward and one backward launch of the CUDA kernels for a profiler (ncu, nsys).

    ncu --section SpeedOfLight python benchmarks/profile_op.py 2 80 1 512 512 float16
"""

import sys

import torch

from gspn_diffusers.ops import gspn_propagate

batch, channels, groups, height, width = map(int, sys.argv[1:6])
dtype = getattr(torch, sys.argv[6])
x = torch.randn(batch, channels, height, width, device="cuda", dtype=dtype, requires_grad=True)
gates = torch.randn(batch, 4, 3, groups, height, width, device="cuda", dtype=dtype, requires_grad=True)
lam = torch.randn(batch, 4, channels, height, width, device="cuda", dtype=dtype, requires_grad=True)
u = torch.randn_like(lam, requires_grad=True)
y = gspn_propagate(x, gates, lam, u)
y.backward(torch.randn_like(y))
torch.cuda.synchronize()

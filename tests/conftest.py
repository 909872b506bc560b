"""Session-wide test setup."""

import os

import torch

# Triton reads TRITON_INTERPRET when triton.language is first imported (its own @jit helpers, tl.max among them),
# and torch can import triton early (the optimisers' torch._dynamo import during training tests). On a machine
# without a GPU the Triton kernels can only run interpreted, so set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

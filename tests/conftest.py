"""Shared fixtures: tiny random DeepSeek checkpoints written by transformers itself (the oracle)."""

from __future__ import annotations

import os

# Triton reads this when it is first imported (and when @triton.jit runs), not at launch: set it before
# anything imports triton (transformers' DeepSeek modules do), so kernel tests interpret on CPUs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests compare against fp32 references; keep thread counts predictable on 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))

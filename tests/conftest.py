"""Shared fixtures: tiny random DeepSeek checkpoints written by transformers itself (the oracle)."""

from __future__ import annotations

import os

import pytest
import torch

# Tests compare against fp32 references; keep thread counts predictable on 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))

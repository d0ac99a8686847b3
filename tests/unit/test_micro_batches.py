"""Micro-batch splitting (exact outputs) and ping-pong forward == plain forward."""

from __future__ import annotations

import pytest

from moemesh.attn_node.runner import split_micro_batches


class _Item:
    def __init__(self, n: int):
        self.num_tokens = n


@pytest.mark.parametrize(
    "tokens, m, expected",
    [
        ([1] * 8, 2, [[1] * 4, [1] * 4]),
        ([1] * 7, 3, [[1, 1], [1, 1, 1], [1, 1]]),
        ([10, 1, 1, 1], 2, [[10], [1, 1, 1]]),
        ([1, 1, 1, 10], 2, [[1, 1, 1], [10]]),
        ([5], 3, [[5]]),
        ([3, 3], 4, [[3], [3]]),
        ([2, 2, 2], 1, [[2, 2, 2]]),
    ],
)
def test_split_is_contiguous_and_balanced(tokens, m, expected):
    parts = split_micro_batches([_Item(n) for n in tokens], m)
    assert [[i.num_tokens for i in p] for p in parts] == expected

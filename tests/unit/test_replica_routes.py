import pytest
import torch

from moemesh.attn_node.experts.replica_routes import ExpertsUnavailable, ReplicaRoutes
from moemesh.control.placement import Placement


def _placement(shares=None):
    # layer 1: expert 0 on node 0 only, expert 1 on nodes 0 and 1, expert 2 on node 1 only
    replicas = {(1, 0): (0,), (1, 1): (0, 1), (1, 2): (1,)}
    return Placement(("a:1", "b:2"), replicas, 3, shares or {})


def test_single_replicas_and_skips():
    routes = ReplicaRoutes((1,), 3, _placement())
    idx = torch.tensor([[0, 2], [2, -1]])
    assert routes.assign(1, idx).tolist() == [[0, 1], [1, -1]]


@pytest.mark.parametrize("share", [0.5, 0.8, 0.1])
def test_rows_split_by_shares_even_at_batch_one(share):
    routes = ReplicaRoutes((1,), 3, _placement({(1, 1): (share, 1 - share)}))
    picks = [routes.assign(1, torch.tensor([[1]])).item() for _ in range(1000)]  # batch 1, 1000 steps
    assert abs(picks.count(0) - 1000 * share) <= 3
    big = routes.assign(1, torch.full((1000, 1), 1))  # one batch of 1000 rows
    assert abs(int((big == 0).sum()) - 1000 * share) <= 3


def test_dead_replica_share_moves_to_the_live_one():
    routes = ReplicaRoutes((1,), 3, _placement({(1, 1): (0.3, 0.7)}))
    routes.rebuild({0})
    assert routes.assign(1, torch.full((50, 1), 1)).unique().tolist() == [0]
    with pytest.raises(ExpertsUnavailable, match="layer 1: experts 2"):
        routes.assign(1, torch.tensor([[0, 2]]))


def test_zero_share_replica_gets_no_rows():
    routes = ReplicaRoutes((1,), 3, _placement({(1, 1): (0.0, 1.0)}))
    assert routes.assign(1, torch.full((200, 1), 1)).unique().tolist() == [1]

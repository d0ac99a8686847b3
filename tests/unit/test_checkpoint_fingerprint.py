"""checkpoint_fingerprint: equal for the same files, different for other weights of the same shape."""

import shutil

import pytest

from moemesh.control.records import NodeRecord
from moemesh.model.checkpoint import CheckpointError, checkpoint_fingerprint
from moemesh.router.cluster import model_shape
from moemesh.model.tiny import write_tiny_checkpoint


def test_same_files_same_fingerprint_other_weights_other(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", hidden_size=32, layers=2, experts=4, experts_per_token=2, seed=0)
    b = write_tiny_checkpoint(tmp_path / "b", hidden_size=32, layers=2, experts=4, experts_per_token=2, seed=1)
    copy = shutil.copytree(a, tmp_path / "copy")
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(copy)
    assert checkpoint_fingerprint(a) != checkpoint_fingerprint(b)
    assert len(checkpoint_fingerprint(a)) == 16
    with pytest.raises(CheckpointError, match="cannot fingerprint"):
        checkpoint_fingerprint(tmp_path / "missing")


def expert(node_id: str, capacity: dict) -> NodeRecord:
    return NodeRecord.from_json({"id": node_id, "role": "expert", "address": "h:1", "status": "ready",
                                 "capacity": capacity})


def test_the_leader_refuses_expert_nodes_on_two_checkpoints():
    cap = {"moe_layers": [1], "n_routed_experts": 4}
    same = [expert("e0", {**cap, "checkpoint": "x"}), expert("e1", {**cap, "checkpoint": "x"})]
    assert model_shape(same) == ((1,), 4)
    mixed = [same[0], expert("e1", {**cap, "checkpoint": "y"})]
    assert "checkpoint y" in model_shape(mixed) and "same checkpoint" in model_shape(mixed)


def test_the_leader_names_an_expert_node_without_the_model_shape():
    assert model_shape([expert("e2", {"slots": 2})]).startswith("expert node e2 does not publish capacity.moe_layers")
    assert model_shape([expert("e3", {"moe_layers": [], "n_routed_experts": 4})]).startswith("expert node e3")

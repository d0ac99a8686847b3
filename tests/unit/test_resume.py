"""The router's resume rules (router/resume.py): which failures move a generation, and what the next node gets."""

from __future__ import annotations

import grpc
import pytest

from moemesh.router.resume import STREAM_ENDED, StreamProgress, failure_reason
from moemesh.v1 import inference_pb2

Code = grpc.StatusCode


@pytest.mark.parametrize("code, status, from_node, want", [
    (Code.UNAVAILABLE, "ready", 5, "unavailable"),  # SIGKILL, lost connection: the record is still there
    (Code.UNAVAILABLE, None, 0, "unavailable"),
    (None, "ready", 3, STREAM_ENDED),  # closed OK without a finish_reason
    (Code.CANCELLED, "draining", 3, "draining"),  # a draining node's grace ran out
    (Code.ABORTED, None, 3, "draining"),  # its record is gone
    (Code.CANCELLED, "ready", 3, None),  # a ready node cancelling is not going away
    (Code.RESOURCE_EXHAUSTED, "ready", 0, "busy"),  # full before taking anything
    (Code.RESOURCE_EXHAUSTED, "ready", 2, None),
    (Code.INVALID_ARGUMENT, "ready", 0, None),  # every node would say the same
    (Code.DEADLINE_EXCEEDED, "ready", 4, None),  # the client's deadline: no time left anywhere
    (Code.INTERNAL, "ready", 4, None),
])
def test_only_failures_that_mean_the_node_went_away_move_the_generation(code, status, from_node, want):
    assert failure_reason(code, status, from_node) == want


def _request(max_tokens=8) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(request_id="r1", sampling=inference_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, stop=["END"]))
    req.token_ids.ids.extend([0, 5, 9])
    return req


def test_next_request_carries_exactly_the_tokens_the_client_has_in_order():
    progress = StreamProgress(_request())
    assert not progress.started and list(progress.next_request().resume_token_ids) == []
    progress.record("attn-0", inference_pb2.GenerateResponse(token_ids=[11], text="a"))
    progress.record("attn-0", inference_pb2.GenerateResponse(token_ids=[12, 13], text=""))
    progress.record("attn-1", inference_pb2.GenerateResponse(token_ids=[14]))
    nxt = progress.next_request()
    assert list(nxt.resume_token_ids) == [11, 12, 13, 14] and progress.nodes == ["attn-0", "attn-1"]
    # Everything else is the client's request, unchanged; the original is not touched.
    assert nxt.request_id == "r1" and list(nxt.token_ids.ids) == [0, 5, 9] and list(nxt.sampling.stop) == ["END"]
    assert list(progress.request.resume_token_ids) == []
    progress.record("attn-1", inference_pb2.GenerateResponse(token_ids=[15]))
    assert list(progress.next_request().resume_token_ids) == [11, 12, 13, 14, 15]  # replaced, not appended


def test_can_resume_only_below_max_tokens():
    progress = StreamProgress(_request(max_tokens=2))
    progress.record("attn-0", inference_pb2.GenerateResponse(token_ids=[11]))
    assert progress.can_resume()
    progress.record("attn-0", inference_pb2.GenerateResponse(token_ids=[12]))
    assert not progress.can_resume()

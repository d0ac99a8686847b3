"""Moving a generation to another attention node when its node dies: what the client has, when to move.

Pure (no I/O), so the rules are tested on their own. The router records the token ids of every response
*after* it has handed it to the client, so a node that dies mid-stream leaves an exact account: the
next node gets the same request plus ``resume_token_ids`` = those ids, treats them as output already
generated (counted in max_tokens and usage, replayed through its text decoder and stop matcher), and
streams only what comes after. The client sees one stream with no token twice and none missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from moemesh.v1 import inference_pb2

Code = grpc.StatusCode
STREAM_ENDED = "stream_ended"  # the node closed the stream OK but without a finish_reason


def failure_reason(code: Code | None, node_status: str | None, tokens_from_node: int) -> str | None:
    """Why an attempt's failure lets the generation move to another node, or None when it must not.

    ``code`` is the attempt's gRPC status (None: the stream ended without a finish_reason);
    ``node_status`` the node's record status now (None: its record is gone);
    ``tokens_from_node`` how many tokens this node streamed before failing.
    Only failures that mean the node died or is going away move work: another node would answer a
    bad request or an expired deadline the same way.
    """
    if code is None:
        return STREAM_ENDED
    if code == Code.UNAVAILABLE:  # process gone, connection lost, node unreachable or shutting down
        return "unavailable"
    if code in (Code.CANCELLED, Code.ABORTED) and node_status in (None, "draining"):
        return "draining"  # a draining node's grace ran out (or it left), not a client cancelling
    if code == Code.RESOURCE_EXHAUSTED and tokens_from_node == 0:
        return "busy"  # its queue is full: it took nothing, so another node may take it
    return None


@dataclass
class StreamProgress:
    """One client stream across attention nodes: the tokens the client has and the nodes that sent them."""

    request: inference_pb2.GenerateRequest  # as the client sent it (request_id filled in)
    sent: list[int] = field(default_factory=list)  # token ids already yielded to the client, in order
    nodes: list[str] = field(default_factory=list)  # nodes that streamed tokens, in order
    resumes: int = 0  # times the generation moved after tokens had reached the client

    def record(self, node_id: str, response: inference_pb2.GenerateResponse) -> None:
        """Call after ``response`` has been handed to the client."""
        self.sent.extend(response.token_ids)
        if not self.nodes or self.nodes[-1] != node_id:
            self.nodes.append(node_id)

    @property
    def started(self) -> bool:
        return bool(self.sent)

    def can_resume(self) -> bool:
        """A node never leaves the last allowed token unfinished, but do not ask for more than max_tokens."""
        return len(self.sent) < self.request.sampling.max_tokens

    def next_request(self) -> inference_pb2.GenerateRequest:
        """The request for the next node: the client's, continuing after the tokens it already has."""
        out = inference_pb2.GenerateRequest()
        out.CopyFrom(self.request)
        out.resume_token_ids[:] = self.sent
        return out

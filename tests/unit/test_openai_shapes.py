"""The HTTP door's pure mappings: OpenAI request fields -> GenerateRequest, responses -> OpenAI shapes."""

from __future__ import annotations

import grpc
import pytest

from moemesh.errors import ResourceExhaustedError, UnavailableError
from moemesh.router.admission import Caller, caller_key
from moemesh.router.generation import NodeStatusError
from moemesh.router.openai_api import sampling, shapes
from moemesh.router.openai_api.errors import APIError, api_error
from moemesh.router.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from moemesh.v1 import inference_pb2


def _lp(token_id, token, logprob, top=()):
    return inference_pb2.TokenLogprob(token_id=token_id, token=token, logprob=logprob,
                                      top=[inference_pb2.TopLogprob(token_id=i, token=t, logprob=p) for i, t, p in top])


ENTRIES = [_lp(5, "He", -0.5, [(5, "He", -0.5), (6, "A", -1.25)]), _lp(7, "llo", float("-inf"), [(7, "llo", -2.0)])]


def test_completion_logprobs_are_the_legacy_shape_with_text_offsets():
    out = shapes.completion_logprobs(ENTRIES, 2, offset=3)
    assert out.model_dump() == {"text_offset": [3, 5], "token_logprobs": [-0.5, -9999.0], "tokens": ["He", "llo"],
                                "top_logprobs": [{"He": -0.5, "A": -1.25}, {"llo": -2.0}]}
    assert shapes.next_offset(out) == 8
    assert shapes.completion_logprobs(ENTRIES[:1], 0).top_logprobs == [None]


def test_chat_logprobs_carry_bytes_and_top_entries():
    out = shapes.chat_logprobs(ENTRIES[:1]).model_dump()
    assert out == {"content": [{"token": "He", "logprob": -0.5, "bytes": [72, 101], "top_logprobs": [
        {"token": "He", "logprob": -0.5, "bytes": [72, 101]}, {"token": "A", "logprob": -1.25, "bytes": [65]}]}]}


def test_usage_and_finish_reason():
    last = inference_pb2.GenerateResponse(finish_reason="length", usage=inference_pb2.Usage(prompt_tokens=4,
                                                                                            completion_tokens=3))
    assert shapes.usage(last).model_dump() == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert shapes.finish_reason(last) == "length" and shapes.finish_reason(inference_pb2.GenerateResponse()) is None


def test_completion_request_maps_every_sampling_field():
    body = CompletionRequest(prompt="hi", max_tokens=5, temperature=0, top_p=0.5, seed=7, stop="x", top_k=-1,
                             ignore_eos=True, stop_token_ids=[3], logprobs=2)
    req = sampling.completion_request(body, "r1")
    assert req.text == "hi" and req.request_id == "r1" and not req.HasField("add_special_tokens")
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, list(s.stop), s.top_k, s.ignore_eos, list(s.stop_token_ids),
            s.logprobs) == (5, 0.0, 0.5, 7, ["x"], 0, True, [3], 2)
    default = sampling.completion_request(CompletionRequest(prompt=[1, 2]), "r2")
    assert list(default.token_ids.ids) == [1, 2] and default.sampling.max_tokens == 16
    assert default.sampling.temperature == 1.0 and not default.sampling.HasField("logprobs")
    assert not default.sampling.HasField("top_p") and not default.sampling.HasField("seed")


@pytest.mark.parametrize("fields, param", [({"n": 2}, "n"), ({"echo": True}, "echo"), ({"suffix": "s"}, "suffix"),
                                           ({"best_of": 2}, "best_of"), ({"logprobs": 21}, "logprobs"),
                                           ({"stop": ["a", ""]}, "stop"), ({"prompt": ["a", "b"]}, "prompt"),
                                           ({"prompt": []}, "prompt"), ({"top_k": -2}, "top_k")])
def test_completion_refusals_name_the_field(fields, param):
    with pytest.raises(APIError) as err:
        sampling.completion_request(CompletionRequest(**{"prompt": "hi", **fields}), "r")
    assert err.value.status == 400 and err.value.param == param and param in err.value.message


def test_chat_request_is_text_without_special_tokens_and_logprobs_k():
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=9,
                                 max_completion_tokens=4, logprobs=True, top_logprobs=3)
    assert sampling.chat_max_tokens(body) == 4
    req = sampling.chat_request(body, "<s>User: hi", "r", 4)
    assert req.text == "<s>User: hi" and req.add_special_tokens is False and req.sampling.logprobs == 3
    plain = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logprobs=True)
    assert sampling.chat_request(plain, "t", "r", 1).sampling.logprobs == 0
    with pytest.raises(APIError, match="top_logprobs needs logprobs"):
        sampling.chat_logprobs(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], top_logprobs=2))


def test_errors_map_to_http_statuses():
    assert api_error(ResourceExhaustedError("full")).status == 429
    assert api_error(UnavailableError("none")).status == 503
    node = api_error(NodeStatusError(grpc.StatusCode.INVALID_ARGUMENT, "bad"))
    assert (node.status, node.message, node.code) == (400, "bad", "invalid_argument")
    assert api_error(ValueError("x")).status == 500
    body = APIError(404, "no such model", param="model", code="model_not_found").body()
    assert body == {"error": {"message": "no such model", "type": "not_found_error", "param": "model",
                              "code": "model_not_found"}}


def test_callers_are_told_apart_alike_through_either_door():
    http = Caller(authorization="Bearer tok", peer="ipv4:10.0.0.1:5000")
    assert caller_key(http, tokens_checked=True) == caller_key(Caller("Bearer tok", (), "ipv4:10.0.0.2:1"),
                                                               tokens_checked=True)
    assert caller_key(http, tokens_checked=False) == "peer:ipv4:10.0.0.1"
    assert "tok" not in repr(http)


def test_completion_top_logprobs_of_tokens_with_the_same_text_keep_the_likelier():
    # two byte tokens of one character both read U+FFFD: the dict keeps the first (likelier), the sampled one's
    entry = _lp(9, "\ufffd", -0.25, [(9, "\ufffd", -0.25), (10, "\ufffd", -1.5), (11, "x", -2.0)])
    assert shapes.completion_logprobs([entry], 3).top_logprobs == [{"\ufffd": -0.25, "x": -2.0}]

"""SamplingParams.check: the one check of a request's sampling fields, at every process boundary."""

from __future__ import annotations

import pytest

from moemesh.errors import InvalidRequestError
from moemesh.sampling import SamplingParams, flag_name
from moemesh.v1 import inference_pb2
from moemesh.wire.requests import sampling_from_proto, sampling_to_proto

pytestmark = pytest.mark.unit
VOCAB = 300


@pytest.mark.parametrize("fields, message", [
    (dict(temperature=-0.5), "temperature must be >= 0 (0 = greedy), got -0.5"),
    (dict(temperature=float("nan")), "temperature must be >= 0 (0 = greedy), got nan"),
    (dict(temperature="0.5"), "temperature must be >= 0 (0 = greedy), got '0.5'"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_k=-1), "top_k must be an integer >= 0 (0 = off), got -1"),
    (dict(top_k=VOCAB + 1), f"top_k must be <= the vocabulary size {VOCAB}, got {VOCAB + 1}"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    (dict(max_tokens=-3), "max_tokens must be an integer >= 1, got -3"),
    (dict(max_tokens=True), "max_tokens must be an integer >= 1, got True"),
    (dict(max_tokens=1 << 32), "max_tokens must be < 2**32, got 4294967296"),
    (dict(seed=1 << 63), "seed must be an integer in [0, 2**63), got 9223372036854775808"),
    (dict(stop_token_ids=(VOCAB,)), f"stop_token_ids [{VOCAB}] are outside the vocabulary (size {VOCAB})"),
    (dict(stop_token_ids=tuple(range(65))), "stop_token_ids has 65 ids; at most 64"),
    (dict(stop=("x",) * 17), "stop has 17 strings; at most 16"),
    (dict(stop=("",)), "stop strings must be 1..256 characters"),
    (dict(ignore_eos=1), "ignore_eos must be a bool, got 1"),
])  # fmt: skip
def test_each_bad_field_is_named(fields, message):
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(**fields).check(VOCAB)
    assert str(exc.value) == message


def test_names_are_the_callers_words_and_vocab_checks_wait_without_a_vocabulary():
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(max_tokens=0).check(name=flag_name)
    assert str(exc.value) == "--max-tokens must be an integer >= 1, got 0"
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(stop_token_ids=(-1,)).check()
    assert str(exc.value) == "stop_token_ids [-1] are outside [0, 2**32)"
    wide = SamplingParams(top_k=10**6, stop_token_ids=(10**6,))
    assert wide.check() is wide  # the SDK does not know the vocabulary: the server checks it


def test_good_params_pass_unchanged():
    p = SamplingParams(max_tokens=4, temperature=0, top_p=0.5, top_k=VOCAB, seed=0, stop_token_ids=(VOCAB - 1,),
                       stop=("END",), ignore_eos=True)
    assert p.check(VOCAB) is p and p.greedy
    assert not SamplingParams(temperature=1e-5).greedy


def test_proto_round_trip_and_wire_names():
    p = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.25, top_k=3, seed=11, stop_token_ids=(1, 2),
                       stop=("a", "bc"), ignore_eos=True)
    assert sampling_from_proto(sampling_to_proto(p), VOCAB) == p
    unset = inference_pb2.SamplingParams(max_tokens=2)  # top_p and seed absent: 1.0 (off) and None
    assert sampling_from_proto(unset, VOCAB) == SamplingParams(max_tokens=2, temperature=0.0)
    with pytest.raises(InvalidRequestError) as exc:
        sampling_from_proto(inference_pb2.SamplingParams(max_tokens=0), VOCAB)
    assert str(exc.value) == "sampling.max_tokens must be an integer >= 1, got 0"

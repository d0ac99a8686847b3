"""The deepseek-r1 reasoning parser: exact splits, and streams that agree with them at every split point."""

from __future__ import annotations

import ast
import inspect
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.openai_api import reasoning
from router.openai_api.reasoning import REASONING_PARSERS, reasoning_parser

R1 = reasoning_parser("deepseek-r1")

SPLITS = [
    # (model output, (reasoning_content, content)) -- vLLM's deepseek_r1 answers, empties as None
    ("Let me think.\n</think>\n\nThe answer is 4.", ("Let me think.\n", "\n\nThe answer is 4.")),
    ("<think>\nhmm\n</think>4", ("\nhmm\n", "4")),  # R1-0528 repeats the start tag
    ("still thinking when max_tokens hit", ("still thinking when max_tokens hit", None)),
    ("<think>cut off", ("cut off", None)),
    ("</think>just the answer", (None, "just the answer")),
    ("thought</think>", ("thought", None)),
    ("a</think>b</think>c", ("a", "b</think>c")),  # only the first end tag splits
    ("x<think>y</think>z", ("x<think>y", "z")),  # a start tag only counts at the very start
    ("<think></think>", (None, None)),
    ("", (None, None)),
    ("<think>", (None, None)),
    ("<thi", ("<thi", None)),
    ("a</thin", ("a</thin", None)),
    ("</think", ("</think", None)),
]


@pytest.mark.parametrize(("text", "expected"), SPLITS)
def test_split(text, expected):
    assert R1.split(text) == expected


def run_stream(pieces) -> tuple[list[tuple[str, str]], str, str]:
    stream = R1.stream()
    outs = [stream.push(p) for p in pieces] + [stream.flush()]
    return outs, "".join(r for r, _ in outs), "".join(c for _, c in outs)


def as_strings(pair):
    return tuple(x or "" for x in pair)


@pytest.mark.parametrize(("text", "expected"), SPLITS)
def test_every_split_into_two_and_three_deltas_agrees_with_split(text, expected):
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        _, r, c = run_stream([text[:i], text[i:j], text[j:]])
        assert (r, c) == as_strings(expected), (text[:i], text[i:j], text[j:])


def test_end_tag_split_across_deltas_exact_outputs():
    outs, _, _ = run_stream(["thinking</th", "ink>answer", " more"])
    assert outs == [("thinking", ""), ("", "answer"), ("", " more"), ("", "")]


def test_start_tag_split_across_deltas_exact_outputs():
    outs, _, _ = run_stream(["<th", "ink>", "\nstep", "</", "think>", "ok"])
    assert outs == [("", ""), ("", ""), ("\nstep", ""), ("", ""), ("", ""), ("", "ok"), ("", "")]


def test_text_that_only_looked_like_a_tag_is_released():
    assert run_stream(["a</thi", "s is not"])[0] == [("a", ""), ("</this is not", ""), ("", "")]
    assert run_stream(["<thing"])[0] == [("<thing", ""), ("", "")]
    assert run_stream(["x</thi"])[0] == [("x", ""), ("</thi", "")]  # held to the end: still reasoning
    assert run_stream(["<thi"])[0] == [("", ""), ("<thi", "")]


def test_nothing_is_held_longer_than_a_possible_tag():
    stream = R1.stream()
    assert stream.push("plain reasoning") == ("plain reasoning", "")
    assert stream.push(" and <") == (" and ", "")  # '<' may open </think>
    assert stream.push("b>") == ("<b>", "")
    assert stream.push("</think>") == ("", "")
    assert stream.push("</think> stays in the content") == ("", "</think> stays in the content")


def test_token_by_token_stream_of_an_r1_answer():
    text = "The user asks 2+2.\nSimple.\n</think>\n\n**4**"
    outs, r, c = run_stream(list(text))
    assert (r, c) == ("The user asks 2+2.\nSimple.\n", "\n\n**4**")
    assert all(not (rd and cd) for rd, cd in outs)  # one character is never both


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="<>/thinkab\n", max_size=40), st.lists(st.integers(0, 40), max_size=6))
def test_any_stream_agrees_with_split(text, cuts):
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    _, r, c = run_stream(pieces)
    assert (r, c) == as_strings(R1.split(text))


def test_registry_and_names():
    assert isinstance(reasoning_parser("deepseek_r1"), type(R1))  # vLLM's spelling of SGLang's name
    assert set(REASONING_PARSERS) == {"deepseek-r1", "deepseek_r1"}
    with pytest.raises(ValueError, match="unknown reasoning parser 'qwen3'.*deepseek-r1"):
        reasoning_parser("qwen3")


def test_module_is_pure():
    tree = ast.parse(inspect.getsource(reasoning))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "typing"}

"""A DeepSeek-R1-style mesh through the HTTP door: `moemesh tiny-checkpoint --chat-template deepseek-r1` and
`moemesh up --http-port 0 --reasoning-parser deepseek-r1`; the reasoning split end to end (whole and streamed,
against the parser on the gRPC SDK's greedy text), and `moemesh bench --serving --http` against the door.

The checkpoint's seed and the prompts were picked by trying a few: with seed 3 the random model's greedy
answer to "hi there" emits the ``</think>`` token after 8 tokens (a natural split), and to "tell me a story"
never does within the limit (everything is reasoning, as vLLM's parser says for an unclosed think).
"""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from moemesh.model.chat_template import ChatTemplate
from moemesh.router import MeshClient
from moemesh.router.openai_api.reasoning import reasoning_parser
from tests.integration.up_proc import moemesh_up

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SEED = 3
SPLIT_PROMPT, NO_END_PROMPT = "hi there", "tell me a story"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("r1")
    model = root / "m"
    subprocess.run([sys.executable, "-m", "moemesh.cli", "tiny-checkpoint", "--seed", str(SEED), "--hidden-size", "64",
                    "--layers", "2", "--experts", "4", "--experts-per-token", "2", "--chat-template", "deepseek-r1",
                    str(model)], check=True, capture_output=True, timeout=120)
    with moemesh_up(["--model", str(model), "--port", "0", "--http-port", "0", "--expert-nodes", "1",
                     "--reasoning-parser", "deepseek-r1", "--log-dir", str(root / "logs")]) as ready:
        yield {**ready, "model_dir": model}


@pytest.fixture(scope="module")
def client(mesh):
    return openai.OpenAI(base_url=mesh["http"], api_key="unused", max_retries=0, timeout=120)


def _sdk_text(mesh, prompt: str) -> str:
    """The greedy answer through the gRPC SDK, on the tokens of the prompt the template renders."""
    rendered = ChatTemplate.from_dir(mesh["model_dir"]).render([{"role": "user", "content": prompt}])
    assert rendered.endswith("<｜Assistant｜><think>\n")  # R1's generation prompt opens the reasoning
    with MeshClient(mesh["router"], timeout_s=120) as sdk:
        ids = sdk.tokenize(rendered)[1:]  # tokenize adds a BOS; the template wrote one
        return sdk.generate(prompt_ids=ids, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True).text


def _door_split(client, prompt: str, stream: bool) -> tuple[str | None, str | None]:
    kwargs = dict(model=client.models.list().data[0].id, messages=[{"role": "user", "content": prompt}],
                  max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        message = client.chat.completions.create(**kwargs).choices[0].message
        return message.reasoning_content, message.content
    reasoning, content = [], []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        content.append(delta.content or "")
    return "".join(reasoning) or None, "".join(content) or None


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_is_split_from_the_answer_as_the_parser_splits_the_sdks_text(client, mesh, stream):
    text = _sdk_text(mesh, SPLIT_PROMPT)
    assert "</think>" in text and not text.endswith("</think>"), f"the greedy answer has no split: {text!r}"
    want = reasoning_parser("deepseek-r1").split(text)
    assert want[0] and want[1] and "</think>" not in want[0] + want[1]
    assert _door_split(client, SPLIT_PROMPT, stream) == want


@pytest.mark.parametrize("stream", [False, True])
def test_an_unclosed_think_is_all_reasoning(client, mesh, stream):
    text = _sdk_text(mesh, NO_END_PROMPT)
    assert "</think>" not in text
    assert _door_split(client, NO_END_PROMPT, stream) == (text, None)


@pytest.mark.slow
def test_bench_serving_against_the_door(mesh, tmp_path):
    lengths = tmp_path / "lengths.jsonl"
    drawn = [(5, 3), (9, 1), (3, 6), (7, 4)]
    lengths.write_text("".join(json.dumps({"prompt_len": p, "output_len": o}) + "\n" for p, o in drawn))
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, "-m", "moemesh.cli", "bench", "--serving", "--http", mesh["http"], "--model",
         str(mesh["model_dir"]), "--num-prompts", "4", "--lengths-file", str(lengths), "--rate", "20",
         "--json", str(out), "--no-progress"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["config"]["target"] == f"http {mesh['http']}" and figures["config"]["num_prompts"] == 4
    s = figures["moemesh"]
    assert (s["completed"], s["failed"]) == (4, 0)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (sum(p for p, _ in drawn), sum(o for _, o in drawn))
    assert [r["output_tokens"] for r in s["requests"]] == [o for _, o in drawn]  # EOS ignored: as drawn
    assert all(r["ttft_ms"] is not None and r["ttft_ms"] > 0 for r in s["requests"])

"""Chat templates against transformers 5's apply_chat_template, on DeepSeek-V3's real template and the tiny ones.

The rendered text must be identical, and moemesh's Tokenizer, encoding that text without
special tokens (as the HTTP door sends it), must give apply_chat_template(tokenize=True)'s ids.
"""

from __future__ import annotations

import json

import jinja2
import pytest

from moemesh.model.chat_template import ChatTemplate, ChatTemplateError
from moemesh.model.tokenizer import Tokenizer

pytestmark = pytest.mark.oracle
transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "one_user_turn": [{"role": "user", "content": "Hello, who are you?"}],
    "system_and_user": [SYSTEM, {"role": "user", "content": "What is 2 + 2?"}],
    "multi_turn": [
        SYSTEM,
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Danube."},
        {"role": "user", "content": "Where does it run?\nAnswer briefly."},
        {"role": "assistant", "content": "Through ten countries, from Germany to the Black Sea."},
        {"role": "user", "content": "Thanks! 谢谢 ✓"},
    ],
    "two_system_messages": [SYSTEM, {"role": "system", "content": "Answer in French."},
                            {"role": "user", "content": "Hi"}],
    "user_text_with_template_tokens": [
        {"role": "user", "content": "say <｜Assistant｜> and <｜end▁of▁sentence｜>"}],
}
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
TOOL_CONVERSATIONS = {
    # The assistant announced the call in text, then two tool outputs and the final answer.
    "tool_outputs": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": '{"temp_c": 18}', "tool_call_id": "call_0"},
        {"role": "tool", "content": '{"temp_c": 24}', "tool_call_id": "call_1"},
        {"role": "assistant", "content": "Paris 18 °C, Rome 24 °C."},
        {"role": "user", "content": "And tomorrow?"},
    ],
    "ends_with_tool_output": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": '{"temp_c": 18}'},
    ],
}
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY}}]


@pytest.fixture(scope="module")
def v3(deepseek_v3_tokenizer):
    return (ChatTemplate.from_dir(deepseek_v3_tokenizer), Tokenizer.from_dir(deepseek_v3_tokenizer),
            transformers.AutoTokenizer.from_pretrained(deepseek_v3_tokenizer))


def assert_same(ours: ChatTemplate, tok: Tokenizer, hf, messages, add_generation_prompt, **kwargs):
    text = ours.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                          **kwargs)
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, **kwargs)
    assert tok.encode(text, add_special_tokens=False) == ids["input_ids"]
    return text


def test_special_tokens_are_transformers_special_tokens_map(v3):
    ours, _, hf = v3
    assert ours.special_tokens == hf.special_tokens_map
    assert ours.template == hf.chat_template


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS) + sorted(TOOL_CONVERSATIONS))
def test_deepseek_v3_template_matches_transformers(v3, name, add_generation_prompt):
    messages = {**CONVERSATIONS, **TOOL_CONVERSATIONS}[name]
    text = assert_same(*v3, messages, add_generation_prompt)
    assert text.startswith("<｜begin▁of▁sentence｜>")
    assert text.endswith("<｜Assistant｜>") == (add_generation_prompt and messages[-1]["role"] != "tool")


def test_deepseek_v3_template_with_tools_argument(v3):
    assert_same(*v3, TOOL_CONVERSATIONS["tool_outputs"], True, tools=TOOLS)


def test_deepseek_v3_tool_call_with_null_content_fails_as_in_transformers(v3):
    """transformers 5 drops None-valued keys; DeepSeek-V3's template then reads a missing content and fails.

    Both refuse the message (here with a clear ChatTemplateError) rather than render something else.
    """
    ours, _, hf = v3
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                {"role": "tool", "content": '{"temp_c": 18}'}]
    with pytest.raises(jinja2.UndefinedError):
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError, match="cannot render these messages.*content"):
        ours.render(messages)


def test_token_counts_of_a_rendered_prompt(v3):
    """The door's prompt_tokens: one BOS, the turn markers as single tokens."""
    ours, tok, _ = v3
    ids = tok.encode(ours.render(CONVERSATIONS["one_user_turn"]), add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[1] == tok.token_to_id("<｜User｜>") and ids[-1] == tok.token_to_id("<｜Assistant｜>")


# ---- the tiny checkpoints' templates ---------------------------------------------------------------------
@pytest.fixture(scope="module", params=["deepseek-v3", "deepseek-r1"])
def tiny(request, tmp_path_factory):
    from moemesh.model.tiny import write_tiny_checkpoint

    d = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), chat_template=request.param)
    return request.param, ChatTemplate.from_dir(d), Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_tiny_templates_match_transformers(tiny, name, add_generation_prompt):
    _, *trio = tiny
    assert_same(*trio, CONVERSATIONS[name], add_generation_prompt)


def test_tiny_templates_structure(tiny):
    kind, ours, tok, hf = tiny
    messages = [*CONVERSATIONS["two_system_messages"], {"role": "assistant", "content": "<think>hmm</think>Bonjour"},
                {"role": "user", "content": "Encore"}]
    text = assert_same(ours, tok, hf, messages, True)
    if kind == "deepseek-v3":
        assert text == ("<s>You are a helpful assistant.\n\nAnswer in French.<｜User｜>Hi"
                        "<｜Assistant｜><think>hmm</think>Bonjour</s><｜User｜>Encore<｜Assistant｜>")
    else:  # R1: earlier reasoning dropped, the generation prompt opens <think>
        assert text == ("<s>You are a helpful assistant.\n\nAnswer in French.<｜User｜>Hi"
                        "<｜Assistant｜>Bonjour</s><｜User｜>Encore<｜Assistant｜><think>\n")
    ids = tok.encode(text, add_special_tokens=False)
    for marker in ("<｜User｜>", "<｜Assistant｜>"):  # single tokens, as in DeepSeek's vocabulary
        assert tok.token_to_id(marker) in ids


def test_tiny_template_raises_on_tool_messages_as_transformers_does(tiny):
    _, ours, _, hf = tiny
    messages = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]
    with pytest.raises(jinja2.TemplateError, match="not tool"):
        hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatTemplateError, match="renders system, user and assistant messages, not tool"):
        ours.render(messages)


# ---- the environment: every global, filter and variable transformers sets up ----------------------------
FEATURES = (
    "{%- set ns = namespace(n=0) -%}"
    "{%- for m in messages -%}{%- if loop.index > 3 %}{% break %}{% endif -%}"
    "{%- set ns.n = ns.n + 1 -%}"
    "[{{ m.role }}|{{ m.content is defined }}|{{ m.reasoning_content | default('-') }}|{{ m.thinking | default('-') }}"
    "|{{ m.tool_calls | default(none) | tojson }}|{{ m | tojson(indent=1, sort_keys=True) }}]"
    "{%- endfor -%}"
    "{% generation %}gen{{ ns.n }}{% endgeneration %}"
    "{{ tools | tojson }}{{ documents | tojson }}{{ bos_token }}{{ eos_token }}{{ pad_token | default('nopad') }}"
    "{{ dict(a=1) | tojson }}{{ add_generation_prompt }}{{ custom | default('nocustom') }}"
    "{{ strftime_now('%Y') | length }}"
    "\n  {% if messages %}\n    trimmed and stripped\n  {% endif %}\n  end"  # trim_blocks, lstrip_blocks
)


def test_environment_matches_transformers(tmp_path):
    from moemesh.model.tiny import write_tiny_checkpoint

    d = write_tiny_checkpoint(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["pad_token"] = {"__type": "AddedToken", "content": "</s>", "special": True}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(FEATURES)  # wins over tokenizer_config's key, as in transformers
    ours, hf = ChatTemplate.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.special_tokens == hf.special_tokens_map
    messages = [{"role": "user", "content": "<b>ü & é</b>"},
                {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL], "reasoning": "because"},
                {"role": "assistant", "content": "x", "thinking": "t"},
                {"role": "user", "content": "never rendered: the loop breaks"}]
    docs = [{"title": "T", "text": "<doc>"}]
    for kwargs in ({}, {"tools": TOOLS, "documents": docs, "custom": "given", "bos_token": "BOS!"}):
        for agp in (True, False):
            text = ours.render(messages, add_generation_prompt=agp, **kwargs)
            assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp, **kwargs)
    assert '"<b>ü & é</b>"' in text and "gen3" in text and "never" not in text and "BOS!" in text


def test_named_templates_use_default_as_transformers(tmp_path):
    from moemesh.model.tiny import write_tiny_checkpoint

    d = write_tiny_checkpoint(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "rag", "template": "RAG {{ messages[0].content }}"},
                            {"name": "default", "template": "DEFAULT {{ messages[0].content }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    messages = [{"role": "user", "content": "q"}]
    ours, hf = ChatTemplate.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.render(messages) == hf.apply_chat_template(messages, tokenize=False) == "DEFAULT q"


"""ChatTemplate without transformers: loading, validation, errors and the sandbox (parity is in tests/oracle)."""

from __future__ import annotations

import json

import pytest

from moemesh.errors import InvalidRequestError
from moemesh.model import chat_template as ct
from moemesh.model.chat_template import ChatTemplate, ChatTemplateError, special_tokens_of
from moemesh.model.tiny import write_tiny_checkpoint

USER = [{"role": "user", "content": "hi"}]


def render(template: str, messages=USER, **kwargs) -> str:
    return ChatTemplate(template, {"bos_token": "<s>"}).render(messages, **kwargs)


def test_raise_exception_is_a_chat_template_error_with_its_message():
    template = "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="first message must be system") as info:
        render(template)
    assert isinstance(info.value, InvalidRequestError)  # the door answers 400


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set x = namespace(_secret=1) %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ messages.append({'role': 'x'}) }}",  # immutable sandbox: no mutating the caller's data
    "{{ dict.__class__.__subclasses__() }}",
])
def test_sandbox_escapes_fail_safely(template):
    with pytest.raises(ChatTemplateError):
        render(template)


def test_dunder_attributes_render_as_nothing():
    """The sandbox answers an unsafe attribute with an undefined value: no class object leaks into the prompt."""
    assert render("[{{ ''.__class__ }}]") == "[]"


def test_messages_are_validated_at_the_boundary():
    for bad, needle in [([], "non-empty list"), ("hi", "non-empty list"), ([["user", "hi"]], r"messages\[0\]"),
                        ([{"content": "hi"}], r"messages\[0\].role"), ([USER[0], {"role": 3}], r"messages\[1\].role")]:
        with pytest.raises(ChatTemplateError, match=needle):
            render("{{ messages }}", bad)
    with pytest.raises(ChatTemplateError, match="tools must be a list"):
        render("x", tools={"name": "f"})


def test_none_valued_keys_are_dropped_and_reasoning_aliased():
    out = render("{% for m in messages %}{{ m.content is defined }}/{{ m.reasoning_content }}/{{ m.thinking }};"
                 "{% endfor %}", [{"role": "assistant", "content": None, "reasoning": "r"},
                                  {"role": "assistant", "content": "c", "thinking": "t"}])
    assert out == "False/r/r;True/t/t;"


def test_the_caller_messages_are_not_modified():
    messages = [{"role": "assistant", "content": None, "reasoning": "r"}]
    render("{{ messages }}", messages)
    assert messages == [{"role": "assistant", "content": None, "reasoning": "r"}]


def test_globals_filters_and_tags():
    assert render("{{ {'a': '<é>'} | tojson }}") == '{"a": "<é>"}'  # not HTML-escaped, not ASCII-escaped
    assert render("{{ [1] | tojson(indent=2) }}") == "[\n  1\n]"
    assert len(render("{{ strftime_now('%Y-%m-%d') }}")) == 10
    assert render("{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "1"
    assert render("{% generation %}{{ bos_token }}x{% endgeneration %}") == "<s>x"
    assert render("{{ dict(a=1)['a'] }}{% set ns = namespace(n=1) %}{% set ns.n = 2 %}{{ ns.n }}") == "12"
    assert render("{% if true %}\n  a\n{% endif %}\n") == "  a\n"  # trim_blocks, lstrip_blocks


def test_variables_special_tokens_and_kwargs():
    t = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools is none }}|{{ x }}",
                     {"bos_token": "<s>", "eos_token": "</s>"})
    assert t.render(USER) == "<s>|</s>|True|True|"
    assert t.render(USER, add_generation_prompt=False, tools=[{"a": 1}], x=5, eos_token="E") == "<s>|E|False|False|5"


def test_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match="does not parse.*line 2"):
        render("ok\n{% if %}")


def test_compiled_templates_are_cached():
    ct._compile.cache_clear()
    render("cached {{ bos_token }}")
    render("cached {{ bos_token }}")
    assert ct._compile.cache_info().hits == 1 and ct._compile.cache_info().misses == 1


def test_from_dir_sources(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "ck")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert ChatTemplate.from_dir(d) == ChatTemplate(cfg["chat_template"], {"bos_token": "<s>", "eos_token": "</s>"})
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    cfg_path.write_text(json.dumps(cfg))
    assert ChatTemplate.from_dir(d).template == "D"
    (d / "chat_template.jinja").write_text("J")
    assert ChatTemplate.from_dir(d).template == "J"
    (d / "chat_template.jinja").unlink()
    cfg["chat_template"] = [{"name": "rag", "template": "R"}]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="none named 'default'"):
        ChatTemplate.from_dir(d)
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    assert ChatTemplate.from_dir(d) is None
    assert ChatTemplate.from_dir(tmp_path / "empty") is None
    none = write_tiny_checkpoint(tmp_path / "none", chat_template=None)
    assert ChatTemplate.from_dir(none) is None


def test_special_tokens_of_reads_every_form():
    cfg = {"bos_token": {"__type": "AddedToken", "content": "<B>"}, "eos_token": "<E>", "unk_token": None,
           "think_token": "<think>", "model_max_length": 10, "extra_special_tokens": {"img_token": "<img>"}}
    assert special_tokens_of(cfg) == {"bos_token": "<B>", "eos_token": "<E>", "think_token": "<think>",
                                      "img_token": "<img>"}
    assert special_tokens_of({"eos_token": "<E>"}, {"pad_token": "<P>"}) == {"eos_token": "<E>", "pad_token": "<P>"}
    # special_tokens_map.json is legacy: transformers ignores it when the config has added_tokens_decoder.
    assert special_tokens_of({"added_tokens_decoder": {}}, {"pad_token": "<P>"}) == {}


def test_tiny_checkpoint_rejects_an_unknown_template(tmp_path):
    with pytest.raises(ValueError, match="chat_template must be one of deepseek-v3, deepseek-r1"):
        write_tiny_checkpoint(tmp_path, chat_template="llama")


def test_tiny_checkpoint_command_writes_the_chosen_template(tmp_path, capsys):
    from moemesh.cli.main import main
    from moemesh.model.tiny_templates import DEEPSEEK_R1

    common = ["--hidden-size", "64", "--layers", "2", "--experts", "4", "--experts-per-token", "2"]
    assert main(["tiny-checkpoint", str(tmp_path / "r1"), "--chat-template", "deepseek-r1", *common]) == 0
    r1 = ChatTemplate.from_dir(tmp_path / "r1")
    assert r1.template == DEEPSEEK_R1 and r1.render(USER).endswith("<｜Assistant｜><think>\n")
    assert main(["tiny-checkpoint", str(tmp_path / "none"), "--chat-template", "none", *common]) == 0
    assert ChatTemplate.from_dir(tmp_path / "none") is None
    assert main(["tiny-checkpoint", str(tmp_path / "v3"), *common]) == 0  # the default: V3's shape
    assert ChatTemplate.from_dir(tmp_path / "v3").render(USER) == "<s><｜User｜>hi<｜Assistant｜>"

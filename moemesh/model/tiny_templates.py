"""Chat templates for tiny checkpoints, shaped like DeepSeek's own (``moemesh tiny-checkpoint --chat-template``).

``deepseek-v3`` follows DeepSeek-V3's tokenizer_config.json template: BOS, then every system
message joined by a blank line, then ``<｜User｜>text`` and ``<｜Assistant｜>text<EOS>`` turns,
and ``<｜Assistant｜>`` as the generation prompt. The tiny tokenizer's BOS/EOS are ``<s>``/``</s>``,
so the template prints ``bos_token``/``eos_token`` where DeepSeek's spells its own tokens out.
Tool calls are left out: a ``tool`` message (or any other role) makes the template raise.

``deepseek-r1`` is DeepSeek-R1's variant: the generation prompt ends in ``<think>\\n`` (the
model's output then starts inside its reasoning, so it has no start tag), and an earlier
assistant turn is shown without its reasoning (the text after its last ``</think>``).
"""

from __future__ import annotations

_SYSTEM = (
    "{%- set ns = namespace(system_prompt='', is_first_sp=true) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if ns.is_first_sp -%}{%- set ns.system_prompt = message['content'] -%}{%- set ns.is_first_sp = false -%}"
    "{%- else -%}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token }}{{ ns.system_prompt -}}"
)


def _turns(assistant_content: str, generation_prompt: str) -> str:
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- '<｜User｜>' + message['content'] -}}"
        "{%- elif message['role'] == 'assistant' -%}" + assistant_content +
        "{{- '<｜Assistant｜>' + content + eos_token -}}"
        "{%- elif message['role'] != 'system' -%}"
        "{{- raise_exception('this chat template renders system, user and assistant messages, not ' "
        "+ message['role']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + generation_prompt + "' -}}{%- endif -%}"
    )


DEEPSEEK_V3 = _SYSTEM + _turns("{%- set content = message['content'] -%}", "<｜Assistant｜>")
DEEPSEEK_R1 = _SYSTEM + _turns(
    "{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}",
    "<｜Assistant｜><think>\\n",
)

CHAT_TEMPLATES = {"deepseek-v3": DEEPSEEK_V3, "deepseek-r1": DEEPSEEK_R1}
# Added (not special) tokens the templates print, as in DeepSeek's tokenizer.json: decoding keeps them in the text.
CHAT_TOKENS = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")

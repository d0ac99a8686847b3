"""Chat templates: turn OpenAI-style messages into the prompt text a checkpoint was trained on.

Rendering follows transformers 5's ``apply_chat_template(tokenize=False)`` (its
``chat_template_utils``), so a prompt built here tokenizes to the ids transformers gives:

* the template is Jinja2 in an ``ImmutableSandboxedEnvironment`` with ``trim_blocks``,
  ``lstrip_blocks`` and the ``loopcontrols`` extension (``{% break %}``), plus a
  ``{% generation %}`` block tag that renders its body (transformers uses it to mark
  assistant tokens; here only the text matters);
* globals ``raise_exception(msg)`` (-> :class:`ChatTemplateError`), ``strftime_now(fmt)``,
  ``dict`` and ``namespace`` (versions that cannot reach Python internals); the
  ``tojson`` filter is ``json.dumps`` without HTML escaping and with
  ``ensure_ascii=False`` (Jinja's own escapes ``<`` and ``&``);
* variables: ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, every
  special token of the tokenizer config as a string (``bos_token``, ``eos_token``, ...),
  and the caller's extra keyword arguments, which win over a special token of that name;
* each message loses the keys whose value is None (OpenAI's ``content: null``): many
  templates print ``None`` otherwise. A consequence transformers 5 shares: DeepSeek-V3's
  template, which tests ``content is none`` for tool calls, fails on such a message;
* a message's reasoning given as ``reasoning_content``, ``thinking`` or ``reasoning`` is
  also visible under ``reasoning_content`` and ``thinking``.

Where the template comes from (as transformers 5 loads it): ``chat_template.jinja`` beside
``tokenizer_config.json`` wins over the config's ``chat_template`` key; that key is a string,
or a list of ``{name, template}`` of which "default" is used. (transformers would pick a
"tool_use" template when tools are passed; one template travels to the router, so moemesh
uses "default" always.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moemesh.errors import InvalidRequestError
from moemesh.model.tokenizer import _token_text  # a string or {"content": ...} (an AddedToken)

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(InvalidRequestError):
    """The chat template refused the messages (its ``raise_exception``) or could not render them."""


# ---- reading a checkpoint ------------------------------------------------------------------------------
def special_tokens_of(tok_cfg: dict[str, Any], legacy_map: dict[str, Any] | None = None) -> dict[str, str]:
    """The named special tokens transformers exposes to templates (its ``special_tokens_map``).

    The seven standard names, plus any other ``*_token`` key and the entries of a dict-valued
    ``extra_special_tokens`` (transformers 5's "model-specific" tokens). ``legacy_map`` is a
    special_tokens_map.json, read by transformers only when the config has no ``added_tokens_decoder``.
    """
    merged = dict(tok_cfg)
    if legacy_map and "added_tokens_decoder" not in tok_cfg:
        merged.update({k: v for k, v in legacy_map.items() if k != "extra_special_tokens"})
    tokens: dict[str, str] = {}
    for key, value in merged.items():
        if key in SPECIAL_TOKEN_KEYS or (key.endswith("_token") and isinstance(value, (str, dict))):
            text = _token_text(value)
            if text is not None:
                tokens[key] = text
    extra = merged.get("extra_special_tokens")
    if isinstance(extra, dict):
        tokens.update({k: t for k, v in extra.items() if (t := _token_text(v)) is not None})
    return tokens


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _config_template(value: Any, path: Path) -> str | None:
    """tokenizer_config.json's ``chat_template``: a string, or a list of named templates (use "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{path}: chat_template lists templates {sorted(map(str, named))} but none named "
                         "'default'; rename the one to use to 'default'")
    raise ValueError(f"{path}: chat_template must be a string or a list of {{name, template}}, "
                     f"got {type(value).__name__}")


# ---- the Jinja environment (the same setup as transformers) ---------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it; render the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's tojson HTML-escapes and takes only indent; templates expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _SafeDict:
    """``dict(...)`` for templates: builds plain dicts, exposes no class attributes to climb through."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed names (no storing ``__class__`` and friends)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick: ``namespace(self=...)`` must still work
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_SafeDict(),
                       namespace=_SafeNamespace)
    return env


_ENV = _environment()


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the model's chat template does not parse (line {exc.lineno}): "
                                f"{exc.message}") from None


# ---- the messages the template sees ----------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A copy made of plain JSON types only (subclasses stripped): the sandbox must not see rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"  # as transformers: an inert placeholder naming the type


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{i}] must be an object with a 'role', got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}].role must be a string (system, user, assistant or tool)")


def template_messages(messages: list[dict]) -> list[dict]:
    """What the template iterates over: None-valued keys dropped, reasoning aliased (module docstring)."""
    out = []
    for message in messages:
        message = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's chat template and the special tokens it may print."""

    template: str
    special_tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The template of a model directory, or None when it ships none (see the module docstring)."""
        model_dir = Path(model_dir)
        cfg_path = model_dir / TOKENIZER_CONFIG
        tok_cfg = _read_json(cfg_path)
        jinja_file = model_dir / TEMPLATE_FILE
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        else:
            template = _config_template(tok_cfg.get("chat_template"), cfg_path)
        if template is None:
            return None
        return cls(template, special_tokens_of(tok_cfg, _read_json(model_dir / "special_tokens_map.json")))

    def check(self) -> None:
        """Compile the template now (ChatTemplateError if it does not parse): a server can warn at start-up."""
        _compile(self.template)

    def render(self, messages: list[dict], /, *, add_generation_prompt: bool = True, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **kwargs: Any) -> str:
        """The prompt text for ``messages``; ChatTemplateError names what the template or the messages got wrong."""
        _check_messages(messages)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ChatTemplateError("tools must be a list of objects (JSON schemas of functions)")
        if documents is not None and not (isinstance(documents, list) and all(isinstance(d, dict) for d in documents)):
            raise ChatTemplateError("documents must be a list of {title, text} objects")
        compiled = _compile(self.template)
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            # One mapping, not keywords: a variable may be called anything ("self" too) without colliding.
            return compiled.render({**variables, "messages": template_messages(messages), "tools": _plain(tools),
                                    "documents": _plain(documents), "add_generation_prompt": add_generation_prompt})
        except jinja2.TemplateError as exc:  # raise_exception, a missing key, a sandbox refusal
            raise ChatTemplateError(f"the chat template cannot render these messages: {exc.message or exc}") from None
        except (TypeError, ValueError, LookupError, ArithmeticError) as exc:  # e.g. adding a str to a list
            raise ChatTemplateError(f"the chat template cannot render these messages: {exc}") from None

"""Text <-> token ids from a checkpoint's ``tokenizer.json``, plus streaming-safe incremental decoding.

Encoding rule: ``encode(text)`` runs the ``tokenizers`` pipeline with its own
post-processor, so whatever ``tokenizer.json`` says about special tokens (DeepSeek's
prepends BOS through a ``TemplateProcessing`` step) is applied, and nothing else.
This is what transformers 5's ``AutoTokenizer`` does for byte-level tokenizer.json
files: measured here, it follows the post-processor and ignores
``tokenizer_config.json``'s ``add_bos_token``. So a prompt encodes to the ids the
oracle sees. Chat templates are not applied here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers

TOKENIZER_FILE = "tokenizer.json"


def _token_text(value: Any) -> str | None:
    """``tokenizer_config.json`` writes special tokens as a string or as ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the BOS/EOS ids the server needs."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_token_id: int | None = None, eos_token_id: int | None = None):
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer | None:
        """The tokenizer of a model directory, or None when it has no tokenizer.json (ids-only serving).

        BOS/EOS come from ``tokenizer_config.json``'s ``bos_token``/``eos_token``, else
        from ``config.json``'s ``bos_token_id``/``eos_token_id`` (first one if a list).
        """
        model_dir = Path(model_dir)
        path = model_dir / TOKENIZER_FILE
        if not path.is_file():
            return None
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"{path} cannot be read by the tokenizers library: {exc}") from None
        tok_cfg = _read_json(model_dir / "tokenizer_config.json")
        model_cfg = _read_json(model_dir / "config.json")

        def special(key: str) -> int | None:
            text = _token_text(tok_cfg.get(f"{key}_token"))
            if text is not None and tok.token_to_id(text) is not None:
                return tok.token_to_id(text)
            value = model_cfg.get(f"{key}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            return value if isinstance(value, int) else None

        return cls(tok, bos_token_id=special("bos"), eos_token_id=special("eos"))

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added/special tokens included (<= the model's vocab_size)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Prompt ids as HF ``AutoTokenizer`` would give them (see the module docstring)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def incremental_decoder(self, *, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns a token stream into text deltas that never split a character.

    A byte-level token can carry half of a UTF-8 character; decoding it alone yields
    U+FFFD. So each ``push`` decodes a short window of recent ids twice -- without and
    with the newest ones -- and emits the difference only once it no longer ends in
    U+FFFD. Decoding a window (not single tokens) also keeps decoder rules that look at
    neighbours (leading-space handling) right. Text that legitimately ends in U+FFFD is
    held back until the next token or :meth:`flush`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window already emitted
        self._read = 0  # end of what has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        self._ids.append(int(token_id))
        emitted = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) > len(emitted) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character at the end of the stream)."""
        emitted = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full[len(emitted) :] if len(full) > len(emitted) else ""

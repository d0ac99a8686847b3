"""Tokenizer: encode/decode round trip, HF-equivalent prompt ids, streaming that never splits a character."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moemesh.model.tiny import build_tokenizer, write_tiny_checkpoint
from moemesh.model.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = ["héllo wörld 你好", "The river ran past the old mill.", "emoji 🙂🚀 and tabs\tand\nnewlines", ""]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tok"), arch="deepseek_v2")


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    t = Tokenizer.from_dir(model_dir)
    assert t is not None
    return t


def test_from_dir_without_tokenizer_is_none(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None


def test_special_ids_and_vocab(tok):
    assert tok.vocab_size == 512
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.token_to_id("</s>") == 1


def test_special_ids_fall_back_to_config(model_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [0, 1]}))
    t = Tokenizer.from_dir(tmp_path)
    assert (t.bos_token_id, t.eos_token_id) == (1, 0)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id  # tokenizer.json's post-processor prepends BOS, as DeepSeek's does
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_matches_transformers(model_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        assert tok.encode(text) == hf(text)["input_ids"] == auto(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == auto.decode(auto(text)["input_ids"], skip_special_tokens=True)


def stream(dec: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder_never_emits_broken_characters(tok, text):
    ids = tok.encode(text)
    pieces = stream(tok.incremental_decoder(), ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_holds_partial_utf8(tok):
    ids = tok.encode("你好", add_special_tokens=False)
    assert len(ids) > 2  # byte-level: 6 bytes, few merges for CJK in an English corpus
    dec = tok.incremental_decoder()
    out = [dec.push(i) for i in ids]
    assert "" in out  # some tokens complete no character
    assert "".join(out) == "你好" and dec.flush() == ""


def test_incremental_decoder_flushes_truncated_character(tok):
    ids = tok.encode("a你", add_special_tokens=False)
    dec = tok.incremental_decoder()
    text = "".join(dec.push(i) for i in ids[:-1])
    assert text == "a"
    assert dec.flush() == "\ufffd"  # the stream ended mid-character: surfaced once, at the end
    assert dec.push(tok.encode("b", add_special_tokens=False)[0]) == "b"  # still usable after flush


def test_incremental_decoder_special_tokens(tok):
    ids = tok.encode("hi") + [tok.eos_token_id]
    assert "".join(stream(tok.incremental_decoder(), ids)) == "hi"
    assert "".join(stream(tok.incremental_decoder(skip_special_tokens=False), ids)) == "<s>hi</s>"


def test_build_tokenizer_pads_small_corpus_and_rejects_tiny_vocab():
    big = build_tokenizer(4096)
    assert big.get_vocab_size(with_added_tokens=True) == 4096
    with pytest.raises(ValueError, match="vocab_size must be >= 262"):
        build_tokenizer(100)

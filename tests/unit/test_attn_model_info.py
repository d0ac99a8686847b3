"""The attention node's ModelInfo carries what the router's HTTP door needs: chat template, special tokens, name."""

from __future__ import annotations

import asyncio

import structlog.testing

from moemesh.attn_node.serve import _warn_if_broken, default_model_name
from moemesh.attn_node.service import AttentionService
from moemesh.cli.main import main
from moemesh.model.chat_template import ChatTemplate
from moemesh.model.config import ModelConfig
from moemesh.model.tokenizer import Tokenizer
from moemesh.v1 import inference_pb2


def model_info(service: AttentionService) -> inference_pb2.ModelInfoResponse:
    return asyncio.run(service.ModelInfo(inference_pb2.ModelInfoRequest(), None))


def test_model_info_round_trips_the_chat_template(tiny_checkpoint):
    d = tiny_checkpoint(arch="deepseek_v3", hidden_size=64, layers=2, experts=8, experts_per_token=2)
    chat = ChatTemplate.from_dir(d)
    service = AttentionService(None, ModelConfig.from_dir(d), Tokenizer.from_dir(d), chat_template=chat,
                               model_name=default_model_name(d))
    info = model_info(service)
    assert info.model_name == d.name and info.has_tokenizer
    # What the router builds from the wire renders as the checkpoint's own template does.
    rebuilt = ChatTemplate(info.chat_template, dict(info.special_tokens))
    assert rebuilt == chat and dict(info.special_tokens) == {"bos_token": "<s>", "eos_token": "</s>"}
    messages = [{"role": "user", "content": "hi"}]
    assert rebuilt.render(messages) == chat.render(messages) == "<s><｜User｜>hi<｜Assistant｜>"


def test_model_info_without_a_template(tiny_checkpoint):
    d = tiny_checkpoint(hidden_size=64, layers=2, experts=8, experts_per_token=2, chat_template=None)
    info = model_info(AttentionService(None, ModelConfig.from_dir(d), None, chat_template=ChatTemplate.from_dir(d)))
    assert (info.chat_template, dict(info.special_tokens), info.model_name, info.has_tokenizer) == ("", {}, "", False)


def test_default_model_name_is_the_directory_name(tmp_path):
    (tmp_path / "DeepSeek-V3").mkdir()
    assert default_model_name(tmp_path / "DeepSeek-V3" / ".." / "DeepSeek-V3") == "DeepSeek-V3"


def test_a_template_that_does_not_parse_is_logged_at_start_up():
    with structlog.testing.capture_logs() as logs:
        _warn_if_broken(ChatTemplate("{% if %}"))
        _warn_if_broken(ChatTemplate("fine"))
        _warn_if_broken(None)
    assert [(e["event"], "does not parse" in e["error"]) for e in logs] == [("chat_template_invalid", True)]


def test_blank_served_model_name_is_a_usage_error(tiny_checkpoint, capsys):
    d = tiny_checkpoint(hidden_size=64, layers=2, experts=8, experts_per_token=2)
    assert main(["attn-node", "--model", str(d), "--expert-nodes", "127.0.0.1:1=all", "--served-model-name", " "]) != 0
    assert "--served-model-name must not be empty" in capsys.readouterr().err

"""The embedded default checkpoint (`moemesh up` without --model): written once, with a chat template."""

from __future__ import annotations

from moemesh.launch.embedded import ensure_demo_model
from moemesh.model.chat_template import ChatTemplate


def test_the_demo_checkpoint_has_a_chat_template_and_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEMESH_HOME", str(tmp_path))
    stale = tmp_path / "demo-tiny-v3"  # a cache written before checkpoints had templates is not reused
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    path = ensure_demo_model()
    assert path.parent == tmp_path and path != stale
    template = ChatTemplate.from_dir(path)  # the README's chat quick start needs it
    assert template is not None and template.render([{"role": "user", "content": "Hi"}]).endswith("<｜Assistant｜>")
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model() == path and (path / "model.safetensors").stat().st_mtime_ns == mtime

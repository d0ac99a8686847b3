"""The HTTP door of a router with no attention node: /health and every call answer 503 in OpenAI's shape."""

from __future__ import annotations

import httpx2 as httpx  # the openai client's HTTP library
import openai
import pytest

from moemesh.router.server import Router
from tests.helpers import BackgroundLoop

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def door(etcd):
    bg = BackgroundLoop()
    router = Router(etcd.endpoint, "door-no-node", http_port=0)
    bg.run(router.start())
    bg.run(router.connected(30))
    yield f"http://127.0.0.1:{router.http_port}"
    bg.run(router.stop(1))
    bg.close()


def test_no_attention_node_is_503(door):
    health = httpx.get(f"{door}/health", timeout=30)
    assert health.status_code == 503 and "no attention node" in health.json()["reason"]
    client = openai.OpenAI(base_url=f"{door}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="m", prompt="hi", max_tokens=2)
    assert err.value.status_code == 503 and "no attention node" in err.value.message
    assert err.value.body["type"] == "service_unavailable_error"

"""Server-sent events of one generation: chunks as ``data:`` lines, ``data: [DONE]`` last.

An error after the stream started (the status line is sent) goes as one ``data: {"error": ...}``
event in OpenAI's error shape, then ``[DONE]``, as vLLM does. However the stream ends (finished,
failed, or the client went away: sse-starlette cancels the generator), the generation is closed,
which cancels the attention node's stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from moemesh.logs import get_logger

from .errors import api_error
from .stream import GenerationStream

DONE = "[DONE]"
log = get_logger("moemesh.router.http")


async def sse_events(stream: GenerationStream, first, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for data in chunks:
            yield data
    except Exception as exc:  # noqa: BLE001 - every failure becomes the stream's error event
        error = api_error(exc)
        log.warning("http_stream_failed", status=error.status, error=error.message)
        yield json.dumps(error.body())
        yield DONE
    finally:
        await stream.close()

"""OpenAI request fields -> the mesh's GenerateRequest (pure: no I/O; each refusal names the field).

Defaults are OpenAI's: temperature 1, top_p 1, max_tokens 16 for completions; chat without a limit
generates up to the model's context (the caller passes ``default_max_tokens``). vLLM's extras users
send (``top_k``, ``ignore_eos``, ``stop_token_ids``) pass through. Only ``n=1`` is served.
"""

from __future__ import annotations

from moemesh.sampling import MAX_LOGPROBS
from moemesh.v1 import inference_pb2

from .errors import APIError, invalid
from .protocol import ChatCompletionRequest, CompletionRequest, _SamplingFields

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def stops(stop: str | list[str] | None) -> list[str]:
    """``stop`` as a list (a string is one stop string); empty strings are refused."""
    given = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in given):
        raise invalid("stop strings must not be empty", "stop")
    return given


def _check_common(body: _SamplingFields) -> None:
    if body.n != 1:
        raise invalid(f"n={body.n} is not supported: this server returns one choice per request (n=1); "
                      "send several requests instead", "n")
    if body.top_k is not None and body.top_k < -1:
        raise invalid(f"top_k must be -1 or 0 (no limit) or a positive number of tokens, got {body.top_k}", "top_k")
    if body.stop_token_ids and any(t < 0 for t in body.stop_token_ids):
        raise invalid("stop_token_ids must be token ids (>= 0)", "stop_token_ids")


def _logprobs_k(value: int | None, field: str) -> int | None:
    if value is not None and value > MAX_LOGPROBS:
        raise invalid(f"{field} must be at most {MAX_LOGPROBS}, got {value}", field)
    return value


def sampling(body: _SamplingFields, max_tokens: int, logprobs: int | None) -> inference_pb2.SamplingParams:
    _check_common(body)
    params = inference_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_k=0 if body.top_k is None or body.top_k < 0 else body.top_k, stop=stops(body.stop),
        stop_token_ids=body.stop_token_ids or (), ignore_eos=body.ignore_eos)
    if body.top_p is not None:
        params.top_p = body.top_p
    if body.seed is not None:
        params.seed = body.seed
    if logprobs is not None:
        params.logprobs = logprobs
    return params


def completion_prompt(prompt) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of a /v1/completions ``prompt``: a string or a list of token ids, one prompt per request."""
    if isinstance(prompt, str):
        return prompt, None
    if not prompt:
        raise invalid("prompt is empty: give a string or a list of token ids", "prompt")
    if all(isinstance(p, int) for p in prompt):
        if any(p < 0 for p in prompt):
            raise invalid("prompt token ids must be >= 0", "prompt")
        return None, list(prompt)
    if len(prompt) != 1:
        raise invalid(f"prompt holds {len(prompt)} prompts: this server takes one prompt per request (send "
                      "several requests)", "prompt")
    return completion_prompt(prompt[0])


def completion_request(body: CompletionRequest, request_id: str) -> inference_pb2.GenerateRequest:
    for field, unsupported in (("echo", body.echo), ("suffix", body.suffix is not None),
                               ("best_of", body.best_of not in (None, 1))):
        if unsupported:
            raise invalid(f"{field} is not supported by this server", field)
    text, ids = completion_prompt(body.prompt)
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    params = sampling(body, max_tokens, _logprobs_k(body.logprobs, "logprobs"))
    request = inference_pb2.GenerateRequest(request_id=request_id, sampling=params)
    if ids is None:
        request.text = text
    else:
        request.token_ids.ids[:] = ids
    return request


def chat_max_tokens(body: ChatCompletionRequest) -> int | None:
    """The client's limit (``max_completion_tokens``, else the older ``max_tokens``), or None."""
    return body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens


def chat_logprobs(body: ChatCompletionRequest) -> int | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    if not body.logprobs:
        return None
    return _logprobs_k(body.top_logprobs or 0, "top_logprobs")


def chat_request(body: ChatCompletionRequest, text: str, request_id: str, max_tokens: int) -> inference_pb2.GenerateRequest:
    """The rendered conversation as text; the template wrote the special tokens (add_special_tokens=false)."""
    if max_tokens < 1:
        raise APIError(400, "the conversation fills the model's context: no room left to generate",
                       param="messages")
    params = sampling(body, max_tokens, chat_logprobs(body))
    return inference_pb2.GenerateRequest(request_id=request_id, text=text, sampling=params, add_special_tokens=False)

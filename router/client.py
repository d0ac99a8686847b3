"""Python SDK for a moemesh cluster: the client side of `moemesh.v1.Inference` (the router's front door).

    from moemesh.router import MeshClient
    with MeshClient("127.0.0.1:50051", token_file="token.txt") as mesh:
        print(mesh.generate("The capital of France is", max_tokens=8, temperature=0).text)
        for chunk in mesh.stream(prompt_ids=[1, 2, 3], max_tokens=32):
            print(chunk.text, end="", flush=True)

`AsyncMeshClient` has the same API on `grpc.aio`: `await mesh.generate(...)`, `async for c in mesh.stream(...)`.

Behaviour every call shares:
- Deadline: every RPC carries one. `timeout_s` (client default, overridable per call) bounds the whole call,
  retries and backoff sleeps included; for `stream`/`generate` it bounds the whole generation.
- Retries: only on UNAVAILABLE (the router or its connection is down or restarting), with exponential backoff
  `backoff_s * 2**n` (capped at MAX_BACKOFF_S) and +-20% jitter, at most `retries` times, within the deadline.
  An UNAVAILABLE whose trailing metadata carries the server's retry pushback "do not retry"
  (gRPC's `grpc-retry-pushback-ms: -1`, moemesh.wire.status.NO_RETRY) is final at once: the router sends it when
  the live expert nodes cannot host every expert (the message names the missing ones), which no retry within
  seconds can fix (it takes an operator adding a node, or a node returning), so retrying would only make every
  client wait its whole backoff to learn the same thing. RESOURCE_EXHAUSTED
  is *not* retried: the servers use it for backpressure (a bounded queue is full), where automatic retries from
  every client would add load exactly when there is none to spare, and gRPC also uses it for oversized messages,
  which never succeed on retry; like vLLM's and Triton's clients we leave that decision to the caller.
- Generate is retried only while no chunk has arrived. Once a token has been delivered, a failure is raised
  (mid-stream, after the chunks already yielded) and never retried: a retry would generate and yield those
  tokens again. (The router itself already moves a request to another attention node in that case.)
- One request id per generation: made client-side (uuid4 hex) unless given, and sent unchanged on every attempt,
  so the server's logs tie the attempts together.
- Errors: every `grpc.RpcError` comes out as `MeshError` (`.code`, `.status`, `.details`), also mid-stream.
  Bad arguments the client can see by itself raise `ValueError` before anything is sent.
- Sampling: keywords (`max_tokens=8, temperature=0, stop="END"`, ...) or `params=` a
  `moemesh.sampling.SamplingParams` the caller built and checked (`SamplingParams(...).check()`).
- Logprobs: `logprobs=k` (0..20) gives every generated token a `TokenLogprob` (`token_id`, `token`: its text
  decoded alone, special tokens included, "" when the model has no tokenizer; `logprob`; `top`: the k most
  likely tokens at that step as `TopLogprob`s, most likely first), in `TokenChunk.logprobs` (one per
  `token_ids` entry) and `GenerateResult.logprobs`; both are None without `logprobs=`. Raw logprobs, as vLLM's
  default: the log-softmax of the model's logits, before temperature, top-k and top-p.
- Auth and TLS: `token`/`token_file` send `authorization: Bearer <token>` metadata (the file is read once, at
  construction). `tls=True` (implied by `ca_file`/`cert_file`/`key_file`) verifies the server against `ca_file`
  (system roots when omitted); `cert_file` + `key_file` add a client certificate for mTLS; `server_name`
  overrides the name checked against the server certificate.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

import grpc
from google.protobuf import json_format

from moemesh.errors import MoemeshError
from moemesh.sampling import SamplingParams
from moemesh.v1 import inference_pb2, inference_pb2_grpc
from moemesh.wire.limits import ROUTER_MAX_MESSAGE_BYTES
from moemesh.wire.requests import sampling_to_proto
from moemesh.wire.status import no_retry, trailing_metadata

__all__ = [
    "AsyncMeshClient",
    "GenerateResult",
    "MeshClient",
    "MeshError",
    "ModelInfo",
    "TokenChunk",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
MAX_BACKOFF_S = 5.0
BACKOFF_JITTER = 0.2
MAX_MESSAGE_BYTES = ROUTER_MAX_MESSAGE_BYTES  # the router takes no more (moemesh/wire/limits.py)
# Set explicitly rather than trusting library defaults. Keepalive pings only while a call is in flight (a long
# prefill can keep a stream silent) and at most 2 without data, so servers with gRPC's default ping policy
# never answer GOAWAY too_many_pings. Reconnect backoff is kept short so a restarted router is found quickly
# by the retries above (the default 1 s initial backoff makes early retries fail fast without reconnecting).
DEFAULT_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 2,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": int(MAX_BACKOFF_S * 1000),
    "grpc.primary_user_agent": "moemesh-python",
}


class MeshError(MoemeshError):
    """A failed call, carrying its gRPC status: `str(e)` is e.g. "INVALID_ARGUMENT: max_tokens must be >= 1"."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code = code
        self.details = details
        super().__init__(f"{code.name}: {details}")

    @property
    def status(self) -> str:
        """The status name, e.g. "UNAVAILABLE"."""
        return self.code.name

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> MeshError:
        code = err.code() if callable(getattr(err, "code", None)) else None
        details = err.details() if callable(getattr(err, "details", None)) else None
        return cls(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN, details or str(err))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a step."""

    token_id: int
    token: str  # decoded alone ("" when the model has no tokenizer)
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's logprob and the step's most likely tokens, most likely first."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...]


@dataclass(frozen=True)
class TokenChunk:
    """One streamed message: new token ids and the text they complete (may be empty mid-character).
    The last chunk has `finish_reason` ("stop" | "length") and `usage` set. With `logprobs=`, `logprobs`
    has one entry per token id."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class GenerateResult:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None  # with `logprobs=`: one per token id


@dataclass(frozen=True)
class ModelInfo:
    model_type: str
    vocab_size: int
    max_position_embeddings: int
    num_hidden_layers: int
    n_routed_experts: int
    num_experts_per_tok: int
    eos_token_ids: list[int]
    has_tokenizer: bool


# ---------------------------------------------------------------------------------------------- shared pieces


def _read_token(token: str | None, token_file: str | Path | None) -> str | None:
    if token is not None and token_file is not None:
        raise ValueError("pass token= or token_file=, not both")
    if token_file is not None:
        try:
            token = Path(token_file).read_text()
        except OSError as e:
            raise ValueError(f"cannot read token_file {str(token_file)!r}: {e}") from e
    if token is None:
        return None
    token = token.strip()
    if not token:
        raise ValueError("the bearer token is empty: give a non-empty token= or token_file=")
    return token


def _read_pem(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {str(path)!r}: {e}") from e


def _credentials(
    tls: bool, ca_file: str | Path | None, cert_file: str | Path | None, key_file: str | Path | None
) -> grpc.ChannelCredentials | None:
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs both cert_file= and key_file=")
    if not (tls or ca_file or cert_file):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_file, "ca_file"),
        private_key=_read_pem(key_file, "key_file"),
        certificate_chain=_read_pem(cert_file, "cert_file"),
    )


def _channel_options(
    options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None, server_name: str | None, secure: bool
) -> list[tuple[str, Any]]:
    merged = dict(DEFAULT_CHANNEL_OPTIONS)
    if server_name is not None:
        if not secure:
            raise ValueError("server_name= only applies to TLS: pass tls=True (or ca_file=)")
        merged["grpc.ssl_target_name_override"] = server_name
    if options is not None:
        merged.update(dict(options.items() if isinstance(options, Mapping) else options))
    return list(merged.items())


def _check_timeout(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    return float(timeout_s)


def _uint(name: str, value: int, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value >= 1 << 32:
        raise ValueError(f"{name} must be an integer in [{minimum}, 2**32), got {value!r}")
    return value


class Sampling(TypedDict, total=False):
    """The sampling keywords of `stream`/`generate` (moemesh.sampling.SamplingParams' fields and defaults);
    `stop` may also be one string."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: Sequence[str] | str | None
    stop_token_ids: Sequence[int] | None
    ignore_eos: bool
    logprobs: int | None


def _generate_request(prompt: str | None, prompt_ids: Sequence[int] | None, params: SamplingParams | None,
                      request_id: str | None, sampling: Sampling) -> inference_pb2.GenerateRequest:
    """Checks what the client can see by itself (SamplingParams.check without the vocabulary); what depends on
    the model (context length, vocab) is the server's to check, and comes back as INVALID_ARGUMENT."""
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("pass exactly one of prompt= (text) or prompt_ids= (token ids)")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}; use prompt_ids= for token ids")
    if params is None:  # else the caller built and checked its own
        stop = sampling.pop("stop", None)
        params = SamplingParams(stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
                                stop_token_ids=tuple(sampling.pop("stop_token_ids", None) or ()),
                                **sampling).check()
    elif sampling:
        raise ValueError(f"pass params= or sampling keywords ({', '.join(sampling)}), not both")
    req = inference_pb2.GenerateRequest(request_id=request_id or uuid.uuid4().hex, sampling=sampling_to_proto(params))
    if prompt is not None:
        req.text = prompt
    else:
        req.token_ids.ids.extend(_uint("prompt_ids[]", t) for t in prompt_ids)  # type: ignore[union-attr]
    return req


def _chunk(resp: inference_pb2.GenerateResponse) -> TokenChunk:
    usage = None
    if resp.HasField("usage"):
        usage = Usage(resp.usage.prompt_tokens, resp.usage.completion_tokens)
    logprobs = [_token_logprob(lp) for lp in resp.logprobs] or None  # asked: one per token, never empty
    return TokenChunk(list(resp.token_ids), resp.text, resp.finish_reason or None, usage, logprobs)


def _token_logprob(msg: inference_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.token, msg.logprob,
                        tuple(TopLogprob(t.token_id, t.token, t.logprob) for t in msg.top))


class _Accumulator:
    """Folds a chunk stream into a GenerateResult."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.token_ids: list[int] = []
        self.texts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.logprobs: list[TokenLogprob] | None = None

    def add(self, chunk: TokenChunk) -> None:
        self.token_ids.extend(chunk.token_ids)
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + chunk.logprobs
        self.texts.append(chunk.text)
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.usage = chunk.usage or self.usage

    def result(self) -> GenerateResult:
        if self.finish_reason is None or self.usage is None:
            raise MeshError(grpc.StatusCode.INTERNAL, "Generate stream ended without finish_reason and usage")
        return GenerateResult(self.request_id, self.token_ids, "".join(self.texts), self.finish_reason, self.usage,
                              self.logprobs)


class _Retry:
    """Deadline and backoff bookkeeping for one logical call (all its attempts)."""

    def __init__(self, timeout_s: float, retries: int, backoff_s: float):
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.attempt = 0

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise MeshError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline of {self.timeout_s:g}s exceeded")
        return left

    def delay_after(self, err: grpc.RpcError) -> float:
        """Seconds to sleep before the next attempt, or raise `err` as a MeshError when it is final."""
        mesh_err = MeshError.from_rpc_error(err)
        if mesh_err.code not in RETRYABLE_CODES or self.attempt >= self.retries or no_retry(trailing_metadata(err)):
            raise mesh_err from None
        delay = min(MAX_BACKOFF_S, self.backoff_s * 2**self.attempt)
        delay *= 1 + random.uniform(-BACKOFF_JITTER, BACKOFF_JITTER)
        if time.monotonic() + delay >= self.deadline:
            raise mesh_err from None  # no time left for another attempt: report what actually went wrong
        self.attempt += 1
        return delay


class _ClientBase:
    """Settings, credentials and the channel, shared by the sync and async clients (``_grpc`` differs)."""

    _grpc: Any = grpc  # grpc or grpc.aio: which channel the subclass opens

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        token: str | None = None,
        token_file: str | Path | None = None,
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name: str | None = None,
        options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
    ):
        if not address:
            raise ValueError("address must be HOST:PORT of a moemesh router")
        self.address = address
        self.timeout_s = _check_timeout(timeout_s)
        self.retries = _uint("retries", retries)
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s!r}")
        self.backoff_s = float(backoff_s)
        bearer = _read_token(token, token_file)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {bearer}"),) if bearer else ()
        self._credentials = _credentials(tls, ca_file, cert_file, key_file)
        self._options = _channel_options(options, server_name, self._credentials is not None)
        if self._credentials is None:
            self._channel = self._grpc.insecure_channel(address, options=self._options)
        else:
            self._channel = self._grpc.secure_channel(address, self._credentials, options=self._options)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)

    def _retry(self, timeout_s: float | None) -> _Retry:
        return _Retry(self.timeout_s if timeout_s is None else _check_timeout(timeout_s), self.retries, self.backoff_s)

    def _start(self, prompt, prompt_ids, params, request_id, timeout_s, sampling) -> tuple[Any, _Retry]:
        """The request and the retry budget of one `stream`/`generate` call; arguments checked (ValueError)."""
        return _generate_request(prompt, prompt_ids, params, request_id, sampling), self._retry(timeout_s)

    def __repr__(self) -> str:
        tls = "tls" if self._credentials is not None else "plaintext"
        return f"{type(self).__name__}({self.address!r}, {tls}, timeout_s={self.timeout_s:g})"


# ------------------------------------------------------------------------------------------------ sync client


class MeshClient(_ClientBase):
    """Blocking client. Thread-safe (one channel, shared); close it, or use it as a context manager."""

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        retry = self._retry(timeout_s)
        while True:
            try:
                return method(request, timeout=retry.remaining(), metadata=self._metadata)
            except grpc.RpcError as err:
                time.sleep(retry.delay_after(err))

    def stream(self, prompt: str | None = None, *, prompt_ids: Sequence[int] | None = None,
               params: SamplingParams | None = None, request_id: str | None = None, timeout_s: float | None = None,
               **sampling: Unpack[Sampling]) -> Iterator[TokenChunk]:
        """Yields chunks as the server sends them. Arguments are checked now (ValueError), the call starts on
        the first `next()`; leaving the loop early cancels the generation on the server."""
        return self._stream(*self._start(prompt, prompt_ids, params, request_id, timeout_s, sampling))

    def _stream(self, request: inference_pb2.GenerateRequest, retry: _Retry) -> Iterator[TokenChunk]:
        while True:
            call = self._stub.Generate(request, timeout=retry.remaining(), metadata=self._metadata)
            delivered = False
            try:
                for resp in call:
                    delivered = True
                    yield _chunk(resp)
                return
            except grpc.RpcError as err:
                if delivered:
                    raise MeshError.from_rpc_error(err) from None
                delay = retry.delay_after(err)
            finally:
                call.cancel()  # no-op once the call has finished; stops the server when the caller stops early
            time.sleep(delay)

    def generate(self, prompt: str | None = None, *, prompt_ids: Sequence[int] | None = None,
                 params: SamplingParams | None = None, request_id: str | None = None, timeout_s: float | None = None,
                 **sampling: Unpack[Sampling]) -> GenerateResult:
        """The whole generation at once (the stream, folded)."""
        request, retry = self._start(prompt, prompt_ids, params, request_id, timeout_s, sampling)
        acc = _Accumulator(request.request_id)
        for chunk in self._stream(request, retry):
            acc.add(chunk)
        return acc.result()

    def tokenize(self, text: str, *, add_special_tokens: bool = True, timeout_s: float | None = None) -> list[int]:
        """The prompt ids of ``text``; ``add_special_tokens=False`` for text that carries its own (chat templates)."""
        request = inference_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        resp = self._unary(self._stub.Tokenize, request, timeout_s)
        return list(resp.token_ids)

    def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        return _model_info(self._unary(self._stub.ModelInfo, inference_pb2.ModelInfoRequest(), timeout_s))

    def cluster_status(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        return _cluster_status(self._unary(self._stub.ClusterStatus, inference_pb2.ClusterStatusRequest(), timeout_s))


def _model_info(resp: inference_pb2.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model_type=resp.model_type,
        vocab_size=resp.vocab_size,
        max_position_embeddings=resp.max_position_embeddings,
        num_hidden_layers=resp.num_hidden_layers,
        n_routed_experts=resp.n_routed_experts,
        num_experts_per_tok=resp.num_experts_per_tok,
        eos_token_ids=list(resp.eos_token_ids),
        has_tokenizer=resp.has_tokenizer,
    )


def _cluster_status(resp: inference_pb2.ClusterStatusResponse) -> dict[str, Any]:
    """The message as JSON-ready dict with the proto's field names, every field present, 64-bit ints as ints:
    {"nodes": [{"id", "role", "address", "status", "experts": [{"layer", "experts"}], "running", "waiting",
    "cache_free"}], "placement_version": int, "leader": str}."""
    return json_format.MessageToDict(
        resp, always_print_fields_with_no_presence=True, preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- async client


class AsyncMeshClient(_ClientBase):
    """`grpc.aio` client with MeshClient's API: `await` the calls, `async for` over `stream(...)`.
    Create it inside the event loop that uses it; `await close()` or `async with`."""

    _grpc = grpc.aio

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncMeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        retry = self._retry(timeout_s)
        while True:
            try:
                return await method(request, timeout=retry.remaining(), metadata=self._metadata)
            except grpc.RpcError as err:
                delay = retry.delay_after(err)
            await asyncio.sleep(delay)

    def stream(self, prompt: str | None = None, *, prompt_ids: Sequence[int] | None = None,
               params: SamplingParams | None = None, request_id: str | None = None, timeout_s: float | None = None,
               **sampling: Unpack[Sampling]) -> AsyncIterator[TokenChunk]:
        """`async for chunk in client.stream(...)`: arguments are checked now (ValueError); the call starts on
        the first iteration. Leaving early: `await it.aclose()` (or let it be collected) cancels the call."""
        return self._stream(*self._start(prompt, prompt_ids, params, request_id, timeout_s, sampling))

    async def _stream(self, request: inference_pb2.GenerateRequest, retry: _Retry) -> AsyncIterator[TokenChunk]:
        while True:
            call = self._stub.Generate(request, timeout=retry.remaining(), metadata=self._metadata)
            delivered = False
            try:
                async for resp in call:
                    delivered = True
                    yield _chunk(resp)
                return
            except grpc.RpcError as err:
                if delivered:
                    raise MeshError.from_rpc_error(err) from None
                delay = retry.delay_after(err)
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def generate(self, prompt: str | None = None, *, prompt_ids: Sequence[int] | None = None,
                       params: SamplingParams | None = None, request_id: str | None = None,
                       timeout_s: float | None = None, **sampling: Unpack[Sampling]) -> GenerateResult:
        request, retry = self._start(prompt, prompt_ids, params, request_id, timeout_s, sampling)
        acc = _Accumulator(request.request_id)
        async for chunk in self._stream(request, retry):
            acc.add(chunk)
        return acc.result()

    async def tokenize(self, text: str, *, add_special_tokens: bool = True, timeout_s: float | None = None) -> list[int]:
        request = inference_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        resp = await self._unary(self._stub.Tokenize, request, timeout_s)
        return list(resp.token_ids)

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        return _model_info(await self._unary(self._stub.ModelInfo, inference_pb2.ModelInfoRequest(), timeout_s))

    async def cluster_status(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        resp = await self._unary(self._stub.ClusterStatus, inference_pb2.ClusterStatusRequest(), timeout_s)
        return _cluster_status(resp)

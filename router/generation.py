"""The router's request path, whatever door a request came in by (gRPC Inference, the OpenAI HTTP door).

A Generate is admitted by its client first (:mod:`.admission`: per-client running and queued limits,
ResourceExhaustedError past them, the slot freed however the call ends), then validated; a ready
attention node is picked (:mod:`.selection` over the loads in :mod:`.pool`) and its token stream
proxied. A node that dies or goes away (UNAVAILABLE; CANCELLED/ABORTED while draining or gone; a stream
that ends without a finish_reason), or one that is full before its first token (RESOURCE_EXHAUSTED), is
left for the next ready node. When tokens had already reached the client, the next node resumes the
generation from the prompt plus exactly those tokens (:mod:`.resume`), at most ``max_resumes`` times,
within the client's deadline, never after the client left.

Transport-neutral: failures are domain errors (``moemesh.errors``; a node's own final status is a
:class:`NodeStatusError` carrying its gRPC code and details), and what a door wants to tell its client
(the node serving the stream, the nodes that streamed it) comes through :class:`CallHooks`. The gRPC
servicer (:mod:`.server`) and the HTTP door (:mod:`.openai_api`) both call :meth:`GenerationPath.generate`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import structlog

from moemesh import metrics
from moemesh.control.cluster_view import ClusterView
from moemesh.control.records import NodeRecord
from moemesh.control.servability import Servability
from moemesh.errors import (
    DeadlineExceededError, InvalidRequestError, MoemeshError, ResourceExhaustedError, UnavailableError,
    UnservableError,
)
from moemesh.logs import get_logger
from moemesh.v1 import inference_pb2
from moemesh.wire.requests import check_request_id, sampling_from_proto
from moemesh.wire.status import details_of, no_retry, trailing_metadata

from .admission import REJECTED, Admission, AdmissionGate, Caller, caller_key
from .pool import AttentionPool
from .resume import StreamProgress, failure_reason
from .selection import NodeLoad

log = get_logger("moemesh.router")
ROLE = "router"  # the metrics label

MAX_TEXT_CHARS = 1 << 20
RETRY_BEFORE_FIRST_TOKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)  # unary calls
MAX_RESUMES = 3  # times one generation may move to another node after tokens reached the client


class NoNodeError(UnavailableError):
    """No attention node can take the call now: retry later."""


class NodeStatusError(MoemeshError):
    """An attention node's own final status for the request (a bad argument it found, its deadline...).

    Doors pass ``code`` and ``details`` on as they are; ``no_retry``: the node said retrying cannot help."""

    def __init__(self, code: grpc.StatusCode, details: str, *, no_retry: bool = False):
        super().__init__(details)
        self.code, self.details, self.no_retry = code, details, no_retry

    @classmethod
    def from_rpc_error(cls, exc: grpc.aio.AioRpcError) -> NodeStatusError:
        return cls(exc.code(), details_of(exc), no_retry=no_retry(trailing_metadata(exc)))


@dataclass(frozen=True)
class GenerationRecord:
    """How a finished stream was served: its nodes (in order, more than one after a resume) and resumes."""

    nodes: tuple[str, ...]
    resumes: int
    finish_reason: str


def _never() -> bool:
    return False


def _no_deadline() -> float | None:
    return None


@dataclass
class CallHooks:
    """What the path asks of the door a call came in by, and tells it.

    ``time_remaining``: seconds to the client's deadline (None: none); ``cancelled``: the client went away;
    ``first_node(node_id)``: awaited before the client's first response; ``finished(record)``: at the end.
    """

    time_remaining: Callable[[], float | None] = _no_deadline
    cancelled: Callable[[], bool] = _never
    first_node: Callable[[str], Awaitable[None]] | None = None
    finished: Callable[[GenerationRecord], None] | None = field(default=None)


class GenerationPath:
    """Admission, validation, node selection, failover and resume for Generate; ModelInfo/Tokenize to a node."""

    def __init__(self, view: ClusterView, pool: AttentionPool, admission: Admission, *,
                 call_timeout_s: float = 10.0, generate_timeout_s: float = 3600.0, max_resumes: int = MAX_RESUMES,
                 tokens_checked: bool = False, servability: Callable[[], Servability | None] = lambda: None):
        if max_resumes < 0:
            raise ValueError(f"max_resumes must be >= 0, got {max_resumes}")
        self.view, self.pool, self.admission = view, pool, admission
        self.gate = AdmissionGate(admission)
        self.call_timeout_s, self.generate_timeout_s, self.max_resumes = call_timeout_s, generate_timeout_s, max_resumes
        self.tokens_checked = tokens_checked  # the bearer token names the client (the door checked it)
        self.servability = servability  # the control plane's verdict on the live placement
        self._model_info: inference_pb2.ModelInfoResponse | None = None
        self._model_info_lock = asyncio.Lock()

    # ---- nodes ------------------------------------------------------------------
    def check_synced(self) -> None:
        if not self.view.synced:
            raise NoNodeError("the router is not connected to etcd yet, so it knows no attention node: retry soon")

    async def ranked(self, exclude: set[str] = frozenset(), request: inference_pb2.GenerateRequest | None = None):
        """Ready nodes best first; given a Generate ``request``, its prompt's prefix holder first (router/pool.py)."""
        self.check_synced()
        ranked = await self.pool.ranked(exclude, request)
        if not ranked and not exclude:
            raise NoNodeError("no attention node is ready")
        return ranked

    async def unary(self, method: str, request, what: str):
        """Call ``method`` on the best ready node; on UNAVAILABLE/RESOURCE_EXHAUSTED try the next."""
        tried: set[str] = set()
        errors: list[str] = []
        while True:
            ranked = await self.ranked(tried)
            if not ranked:
                raise NoNodeError(f"no attention node answered {what}: {'; '.join(errors)}")
            record, _ = ranked[0]
            tried.add(record.id)
            try:
                return await getattr(self.pool.stub(record), method)(request, timeout=self.call_timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRY_BEFORE_FIRST_TOKEN:
                    raise NodeStatusError.from_rpc_error(exc) from None
                self.pool.forget_load(record.id)
                errors.append(f"{record.id}: {exc.code().name} {exc.details()}")

    async def model_info(self) -> inference_pb2.ModelInfoResponse:
        """The model's shape, asked of an attention node once and kept (forgotten when none is left)."""
        if not self.view.records("attn"):
            self._model_info = None
        if self._model_info is None:
            async with self._model_info_lock:
                if self._model_info is None:
                    self._model_info = await self.unary("ModelInfo", inference_pb2.ModelInfoRequest(), "ModelInfo")
        return self._model_info

    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidRequestError(f"text has {len(text)} characters; at most {MAX_TEXT_CHARS}")
        request = inference_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        reply = await self.unary("Tokenize", request, "Tokenize")
        return list(reply.token_ids)

    def unservable(self, node_error: grpc.aio.AioRpcError | None = None) -> UnservableError | None:
        """Why no attention node can serve a generation now, or None.

        The live placement lacks experts that no re-plan can place (``moemesh.control.servability``: the
        router's verdict), or the attention node that just failed said so (its status carries NO_RETRY).
        Either way every node would fail alike: the call ends at once, with the missing experts named,
        instead of each attempt waiting ``expert_wait_s`` for a placement that cannot come. While a re-plan
        can place them (``degraded``), calls go on to the attention nodes, whose steps wait for it."""
        if node_error is not None and no_retry(trailing_metadata(node_error)):
            return UnservableError(node_error.details() or "the mesh cannot serve")
        verdict = self.servability()
        return None if verdict is None else verdict.error()

    # ---- Generate ---------------------------------------------------------------
    async def validate(self, request: inference_pb2.GenerateRequest) -> None:
        """Every field the router can check without the model's files (InvalidRequestError names it)."""
        check_request_id(request.request_id)
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise InvalidRequestError("prompt is missing: set prompt text or token_ids")
        if request.resume_token_ids:
            raise InvalidRequestError("resume_token_ids is internal to the cluster (router -> attention node); "
                                      "clients must leave it empty")
        info = await self.model_info()
        sampling = sampling_from_proto(request.sampling, info.vocab_size)
        context = info.max_position_embeddings
        if kind == "text":
            if not request.text:
                raise InvalidRequestError("prompt text is empty: give some text or token_ids")
            if len(request.text) > MAX_TEXT_CHARS:
                raise InvalidRequestError(f"prompt text has {len(request.text)} characters; at most {MAX_TEXT_CHARS}")
            if not info.has_tokenizer:
                raise InvalidRequestError("this model has no tokenizer: send prompt token_ids instead of text")
            n_prompt = 1  # the attention node counts the tokens; at least one
        else:
            ids = request.token_ids.ids
            if not ids:
                raise InvalidRequestError("prompt token_ids is empty: give at least one token")
            bad = [t for t in ids if t >= info.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt token_ids {bad[:5]} are outside the vocabulary "
                                          f"(0..{info.vocab_size - 1})")
            n_prompt = len(ids)
        if context and n_prompt + sampling.max_tokens > context:
            raise InvalidRequestError(
                f"prompt ({n_prompt} tokens) + sampling.max_tokens ({sampling.max_tokens}) exceeds the model's "
                f"context of {context} tokens: shorten the prompt or lower max_tokens")

    @property
    def inflight(self) -> int:
        """Generate streams running or queued at this router."""
        return self.admission.running + self.admission.queued

    async def _admit(self, caller: Caller, hooks: CallHooks):
        """This call's admission ticket, once it may run; ResourceExhaustedError past the caller's limits."""
        ticket = self.gate.admit(caller_key(caller, tokens_checked=self.tokens_checked))
        if ticket.state == REJECTED:
            metrics.ADMISSION_REJECTIONS.labels(ROLE, ticket.reason).inc()
            log.warning("generate_refused", reason=ticket.reason, running=self.admission.running,
                        queued=self.admission.queued)
            raise ResourceExhaustedError(ticket.message)
        try:
            await self.gate.wait(ticket, hooks.time_remaining())
        except asyncio.TimeoutError:
            self.gate.release(ticket)
            raise DeadlineExceededError(
                "the client's deadline passed while the request waited at the router for a running slot") from None
        except BaseException:  # cancelled (the client left) while queued
            self.gate.release(ticket)
            raise
        return ticket

    async def generate(self, request: inference_pb2.GenerateRequest, caller: Caller,
                       hooks: CallHooks | None = None) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """The client's stream of responses; raises MoemeshError (NodeStatusError: a node's own status)."""
        hooks = hooks or CallHooks()
        rid = request.request_id or uuid.uuid4().hex
        with structlog.contextvars.bound_contextvars(request_id=rid):
            started = last = time.monotonic()
            ticket = await self._admit(caller, hooks)
            outcome = "cancelled"  # unless the stream ends otherwise
            first = True
            try:
                async for response in self._generate(request, rid, hooks):
                    now = time.monotonic()
                    (metrics.TIME_TO_FIRST_TOKEN if first else metrics.TIME_PER_OUTPUT_TOKEN).labels(ROLE).observe(
                        now - (started if first else last))
                    metrics.GENERATED_TOKENS.labels(ROLE).inc(len(response.token_ids))
                    first, last = False, now
                    if response.finish_reason:
                        outcome = response.finish_reason
                    yield response
            except BaseException as exc:
                outcome = "cancelled" if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else "error"
                raise
            finally:
                self.gate.release(ticket)  # finished, failed, cancelled or the client left: the slot frees
                metrics.REQUESTS.labels(ROLE, outcome).inc()

    async def _generate(self, request, rid: str, hooks: CallHooks):
        started = time.monotonic()
        try:
            await self.validate(request)
        except MoemeshError as exc:
            log.info("generate_rejected", error=exc.details if isinstance(exc, NodeStatusError) else str(exc))
            raise
        unservable = self.unservable()
        if unservable is not None:
            log.warning("generate_unservable", error=str(unservable))
            raise unservable
        forward = inference_pb2.GenerateRequest()
        forward.CopyFrom(request)
        forward.request_id = rid
        progress = StreamProgress(forward)
        tried: set[str] = set()
        errors: list[str] = []
        codes: list[grpc.StatusCode | None] = []
        failed: tuple[str, str] | None = None  # (node, reason) of the last attempt that broke
        while True:
            record, load = await self._pick_node(progress, tried, errors, codes)
            node_id = record.id
            tried.add(node_id)
            if progress.started:
                self._note_resume(progress, node_id, *failed)
            call = self.pool.stub(record).Generate(progress.next_request(), timeout=self._attempt_timeout(hooks),
                                                   metadata=(("x-request-id", rid),))
            self.pool.streams[node_id] = self.pool.streams.get(node_id, 0) + 1
            from_node, code, details = 0, None, "the stream ended without a finish_reason"
            node_error: grpc.aio.AioRpcError | None = None
            try:
                async for response in call:
                    if not progress.nodes:  # the client's first response: name the node serving it
                        if hooks.first_node is not None:
                            await hooks.first_node(node_id)
                        log.info("generate_first_token", node=node_id, attempts=len(tried), node_queue=load.queue,
                                 ttft_ms=round((time.monotonic() - started) * 1000, 1))
                    yield response
                    progress.record(node_id, response)  # only now does the client have it
                    from_node += 1
                    if response.finish_reason:
                        self._finish(hooks, progress, response, started)
                        return
            except grpc.aio.AioRpcError as exc:
                code, details, node_error = exc.code(), exc.details() or exc.code().name, exc
            finally:
                self.pool.streams[node_id] -= 1
                call.cancel()  # also when the client left: the node stops the generation and frees its cache
            unservable = self.unservable(node_error)
            if unservable is not None:  # another node would fail alike: fail once, saying why
                log.warning("generate_unservable", node=node_id, error=str(unservable), tokens_sent=len(progress.sent))
                raise unservable
            reason = failure_reason(code, self._node_status(node_id), from_node)
            self._check_can_move(hooks, progress, node_id, code, details, reason)
            self.pool.forget_load(node_id)
            errors.append(f"{node_id}: {code.name if code else 'OK'} {details}")
            codes.append(code)
            failed = (node_id, reason)
            log.warning("generate_failover", node=node_id, code=code.name if code else None, error=details,
                        reason=reason, tokens_sent=len(progress.sent))

    async def _pick_node(self, progress: StreamProgress, tried: set[str], errors: list[str],
                         codes: list) -> tuple[NodeRecord, NodeLoad]:
        """The best ready node not tried yet; when none is left, an error saying what each answered."""
        ranked = await self.ranked(tried, progress.request)
        if ranked:
            return ranked[0]
        log.warning("generate_no_node", tried=sorted(tried), errors=errors, tokens_sent=len(progress.sent))
        busy = set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # all full: back off, do not reconnect
        after = f" after {len(progress.sent)} token(s) were streamed" if progress.started else ""
        raise (ResourceExhaustedError if busy else UnavailableError)(
            f"no attention node could take the request{after}: {'; '.join(errors)}")

    def _attempt_timeout(self, hooks: CallHooks) -> float:
        remaining = hooks.time_remaining()  # the client's deadline bounds every attempt
        return self.generate_timeout_s if remaining is None else min(remaining, self.generate_timeout_s)

    def _node_status(self, node_id: str) -> str | None:
        """The node's record status now; None when its record is gone (lease expired, node left)."""
        record = self.view.node("attn", node_id)
        return None if record is None else record.status

    def _check_can_move(self, hooks: CallHooks, progress: StreamProgress, node_id: str, code, details: str,
                        reason: str | None) -> None:
        """Raise unless the generation may go on on another node."""
        tokens = len(progress.sent)
        if reason is None:  # the request's own failure (bad argument, deadline, ...): another node would agree
            log.warning("generate_failed", node=node_id, code=code.name, error=details, tokens=tokens)
            raise NodeStatusError(code, details)
        if hooks.cancelled():  # the client went away: nobody to resume for
            log.info("generate_cancelled", node=node_id, tokens=tokens)
            raise asyncio.CancelledError()
        remaining = hooks.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError(
                f"attention node {node_id} failed ({details}) after {tokens} token(s) and the client's deadline "
                "has passed")
        if progress.started and (progress.resumes >= self.max_resumes or not progress.can_resume()):
            log.warning("generate_failed", node=node_id, code=code.name if code else None, error=details,
                        tokens=tokens, resumes=progress.resumes)
            raise UnavailableError(
                f"attention node {node_id} failed after streaming {tokens} token(s) and the generation has "
                f"already moved {progress.resumes} time(s): {details}")

    def _note_resume(self, progress: StreamProgress, node_id: str, failed_node: str, reason: str) -> None:
        progress.resumes += 1
        metrics.GENERATE_RESUMES.labels(ROLE, reason).inc()
        log.info("generate_resumed", node=node_id, failed_node=failed_node, reason=reason,
                 tokens_carried=len(progress.sent), resumes=progress.resumes)

    def _finish(self, hooks: CallHooks, progress: StreamProgress, last, started: float) -> None:
        if hooks.finished is not None:
            hooks.finished(GenerationRecord(tuple(progress.nodes), progress.resumes, last.finish_reason))
        log.info("generate_done", node=progress.nodes[-1], finish_reason=last.finish_reason,
                 completion_tokens=last.usage.completion_tokens, resumes=progress.resumes,
                 seconds=round(time.monotonic() - started, 3))

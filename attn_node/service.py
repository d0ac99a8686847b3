"""The attention node's gRPC service (AttentionNode): Generate streams and Load, over an EngineLoop.

Thin: it validates the request (INVALID_ARGUMENT naming the field), hands it to
the engine thread, and turns token events into streamed responses with text
decoded incrementally and stop strings applied, and, when the request asked, each
token's logprobs (the tokens' texts decoded alone). A client that goes away has
its request aborted, freeing its cache.

Resuming (``resume_token_ids``, from the router after another node failed mid-stream): those
tokens follow the prompt as output already generated. They count against max_tokens and in
usage.completion_tokens, a seeded generator skips their draws, and the text decoder and stop
matcher are replayed over them first, so the stream continues exactly where the client's text
stands: what the failed node had sent is not sent again, and text it held back (a partial
character, a possible stop-string prefix) is still held here and sent when it resolves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable

import structlog

from moemesh import metrics
from moemesh.model.config import ModelConfig
from moemesh.errors import FailedPreconditionError, InvalidRequestError, MoemeshError
from moemesh.logs import get_logger
from moemesh.sampling import SamplingParams
from moemesh.wire.requests import StopStringMatcher, check_request_id, sampling_from_proto
from moemesh.wire.server import create_server
from moemesh.wire.status import abort
from moemesh.wire.tls import TLSFiles
from moemesh.model.chat_template import ChatTemplate
from moemesh.model.tokenizer import IncrementalDecoder, Tokenizer
from moemesh.v1 import attention_pb2, attention_pb2_grpc, inference_pb2

from .engine import TokenEvent
from .engine_loop import EngineLoop
from .logprobs import TokenLogprobs
from .experts.hop_stats import HOPS
from .load_stats import LoadStats

log = get_logger("moemesh.attn_node.service")
MAX_TOKENIZE_CHARS = 1 << 20
# Keys of cached blocks a Load reply carries at most, most recently used first (8 bytes each: 32 KiB). The
# router matches prompts against them; a bigger cache's older keys go unpublished and only lose routing hits.
MAX_PUBLISHED_HASHES = 4096
ROLE = "attn"
SERVICE_NAME = attention_pb2.DESCRIPTOR.services_by_name["AttentionNode"].full_name


class AttentionService(attention_pb2_grpc.AttentionNodeServicer):
    """``chat_template`` and ``model_name`` are only reported (ModelInfo): the router renders chats and names the
    model to HTTP clients."""

    def __init__(self, loop: EngineLoop, cfg: ModelConfig, tokenizer: Tokenizer | None, stats: LoadStats | None = None,
                 *, chat_template: ChatTemplate | None = None, model_name: str = ""):
        self.loop, self.cfg, self.tokenizer, self.stats = loop, cfg, tokenizer, stats
        self.chat_template, self.model_name = chat_template, model_name

    def _prompt(self, request: inference_pb2.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind == "text":
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send prompt.token_ids instead of text")
            # Text rendered from a chat template carries its own BOS: add_special_tokens=false (unset = true).
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            return self.tokenizer.encode(request.text, add_special_tokens=add)
        raise InvalidRequestError("prompt is missing: set text or token_ids")

    def _engine_inputs(self, request) -> tuple[list[int], list[int], SamplingParams, StopStringMatcher]:
        check_request_id(request.request_id)
        prompt = self._prompt(request)
        s = sampling_from_proto(request.sampling, self.cfg.vocab_size)
        resume = list(request.resume_token_ids)
        if len(resume) >= s.max_tokens:
            raise InvalidRequestError("resume_token_ids must be fewer than sampling.max_tokens")
        bad = [t for t in resume if t >= self.cfg.vocab_size]
        if bad:
            raise InvalidRequestError(f"resume_token_ids {bad[:5]} are outside the vocabulary "
                                      f"(0..{self.cfg.vocab_size - 1})")
        # A stop or EOS token among them would have ended the generation on the node that sampled it.
        ended = [t for t in resume if t in s.stop_token_ids or (not s.ignore_eos and t in self.cfg.eos_token_ids)]
        if ended:
            raise InvalidRequestError(f"resume_token_ids contain stop/EOS token {ended[0]}: that generation "
                                      "had already finished")
        # The engine samples what is left of max_tokens; the stop strings stay here, with the text.
        params = dataclasses.replace(s, max_tokens=s.max_tokens - len(resume), stop=())
        return prompt, resume, params, StopStringMatcher(s.stop)

    async def Generate(self, request, context):
        try:
            prompt, resume, params, matcher = self._engine_inputs(request)
            decoder = self.tokenizer.incremental_decoder() if self.tokenizer else None
            replay_streamed_text(resume, decoder, matcher)
        except InvalidRequestError as exc:
            await abort(context, exc)
        # The router sends its request id in the request and in x-request-id; every log line of this call carries it.
        metadata = dict(context.invocation_metadata() or ())
        rid = request.request_id or metadata.get("x-request-id") or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(request_id=rid)
        events: asyncio.Queue = asyncio.Queue()
        aio_loop = asyncio.get_running_loop()
        if resume:
            log.info("request_resumed", prompt_tokens=len(prompt), resumed_tokens=len(resume))
        try:
            self.loop.submit(rid, prompt + resume, params,
                             lambda ev: aio_loop.call_soon_threadsafe(events.put_nowait, ev), resumed=len(resume))
        except MoemeshError as exc:  # invalid for this engine, or its inbox is full
            await abort(context, exc)
        produced, finished = len(resume), False
        started = last = time.monotonic()
        try:
            while True:
                ev = await events.get()
                if ev.error is not None:
                    finished = True
                    metrics.REQUESTS.labels(ROLE, "error").inc()
                    log.warning("request_failed", error=str(ev.error), kind=type(ev.error).__name__)
                    await abort(context, ev.error)
                now = time.monotonic()
                if produced == len(resume):
                    metrics.TIME_TO_FIRST_TOKEN.labels(ROLE).observe(now - started)
                else:
                    metrics.TIME_PER_OUTPUT_TOKEN.labels(ROLE).observe(now - last)
                last = now
                metrics.GENERATED_TOKENS.labels(ROLE).inc()
                produced += 1
                piece = decoder.push(ev.token_id) if decoder else ""
                if ev.finished and decoder:
                    piece += decoder.flush()
                text, stopped = matcher.push(piece)
                reason = "stop" if stopped else ev.finish_reason
                if stopped or ev.finished:
                    finished = True
                    metrics.REQUESTS.labels(ROLE, reason).inc()
                    log.info("request_finished", prompt_tokens=len(prompt), completion_tokens=produced,
                             finish_reason=reason, seconds=round(time.monotonic() - started, 4))
                    if stopped and not ev.finished:
                        self.loop.abort(rid)
                    text += "" if stopped else matcher.flush()
                    yield inference_pb2.GenerateResponse(
                        request_id=rid, token_ids=[ev.token_id], text=text, finish_reason=reason,
                        usage=inference_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=produced),
                        logprobs=self._logprobs(ev))  # a stop string's last token keeps its logprob too
                    return
                yield inference_pb2.GenerateResponse(request_id=rid, token_ids=[ev.token_id], text=text,
                                                     logprobs=self._logprobs(ev))
        finally:
            if not finished:  # the client cancelled or the stream broke: free the request's cache
                metrics.REQUESTS.labels(ROLE, "cancelled").inc()
                self.loop.abort(rid)

    def _logprobs(self, ev: TokenEvent) -> list[inference_pb2.TokenLogprob]:
        """The event's logprobs as the response carries them (none when the request did not ask)."""
        if ev.logprobs is None:
            return []
        return [token_logprob_proto(ev.logprobs, self._token_text)]

    def _token_text(self, token_id: int) -> str:
        """A token decoded alone, special tokens included (as vLLM shows them); '' without a tokenizer."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else ""

    async def Tokenize(self, request, context):
        if self.tokenizer is None:
            await abort(context, FailedPreconditionError("this model has no tokenizer.json"))
        if len(request.text) > MAX_TOKENIZE_CHARS:
            await abort(context, InvalidRequestError(f"text is longer than {MAX_TOKENIZE_CHARS} characters"))
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        return inference_pb2.TokenizeResponse(token_ids=self.tokenizer.encode(request.text, add_special_tokens=add))

    async def ModelInfo(self, request, context):
        cfg, chat = self.cfg, self.chat_template
        return inference_pb2.ModelInfoResponse(
            model_type=cfg.arch, vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
            num_hidden_layers=cfg.num_hidden_layers, n_routed_experts=cfg.n_routed_experts,
            num_experts_per_tok=cfg.num_experts_per_tok, eos_token_ids=list(cfg.eos_token_ids),
            has_tokenizer=self.tokenizer is not None, model_name=self.model_name,
            chat_template=chat.template if chat else "", special_tokens=chat.special_tokens if chat else {})

    async def Load(self, request, context):
        blocks = self.loop.engine.blocks
        cache = blocks.snapshot(MAX_PUBLISHED_HASHES)  # one consistent view, taken under the manager's lock
        loads = self.stats.snapshot() if self.stats is not None else {}
        return attention_pb2.LoadResponse(
            running=self.loop.num_running(), waiting=self.loop.num_waiting(),
            cache_free_tokens=cache.num_free * blocks.block_size, cache_total_tokens=blocks.capacity_tokens,
            expert_loads=[attention_pb2.LayerLoad(layer=layer, tokens=tokens) for layer, tokens in loads.items()],
            window_seconds=self.stats.window_s if self.stats is not None else 0.0,
            prompt_tokens=cache.prompt_tokens, prefix_hit_tokens=cache.prefix_hit_tokens,
            cached_blocks=cache.cached_blocks, evicted_blocks=cache.evicted_blocks, block_size=blocks.block_size,
            prefix_hashes=cache.prefix_hashes,
            expert_hops=[attention_pb2.ExpertHops(address=h.address, samples=h.samples, hop_p50_us=h.hop_p50_us,
                                                  hop_p99_us=h.hop_p99_us, compute_p50_us=h.compute_p50_us)
                         for h in HOPS.summaries()],
            hop_window_seconds=HOPS.window_s, micro_batches=self.loop.engine.micro.current)


def token_logprob_proto(lp: TokenLogprobs, text: Callable[[int], str]) -> inference_pb2.TokenLogprob:
    """``lp`` on the wire, each token with its text as ``text`` decodes it."""
    return inference_pb2.TokenLogprob(
        token_id=lp.token_id, token=text(lp.token_id), logprob=lp.logprob,
        top=[inference_pb2.TopLogprob(token_id=t, token=text(t), logprob=v) for t, v in lp.top])


def replay_streamed_text(resume: list[int], decoder: IncrementalDecoder | None, matcher: StopStringMatcher) -> None:
    """Bring ``decoder`` and ``matcher`` to where they stood after the failed node's last sent token.

    Their output is dropped (the client has it); what they still hold is the text that node held back.
    """
    for token in resume:
        _, stopped = matcher.push(decoder.push(token) if decoder else "")
        if stopped:  # that node would have finished the stream there
            raise InvalidRequestError("resume_token_ids complete a stop string: that generation had already finished")


def attention_server(service: AttentionService, host: str = "127.0.0.1", port: int = 0, tls: TLSFiles | None = None):
    """The AttentionNode server (see :func:`moemesh.wire.server.create_server`); returns (server, port, health)."""
    return create_server("attn", lambda server: attention_pb2_grpc.add_AttentionNodeServicer_to_server(service, server),
                         (SERVICE_NAME,), host, port, tls=tls)

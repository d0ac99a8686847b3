"""The attention engine: continuous batching over the paged latent cache, one ``step`` at a time.

``Engine(model, cfg, EngineConfig, backend=...)`` takes a :class:`Transformer` whose
MoE layers are attached to ``backend`` (attn_node/attach.py: ``attach_experts``)
and brackets every model run with that backend's step hooks. Requests join with
``add_request`` and leave when they finish; ``step`` is schedule -> run ->
postprocess: the scheduler picks the step's tokens, the model runs once (re-run
on a new placement if its experts were unreachable) and samples, and the
scheduler applies the sampled tokens. ``generate`` runs a list of prompts to
completion as one continuously batched job.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from moemesh.model.config import ModelConfig
from moemesh.errors import InvalidRequestError, MoemeshError
from moemesh.expert_backend import ExpertBackend, ExpertBackendError, require_backend
from moemesh.logs import get_logger
from moemesh.sampling import SamplingParams
from moemesh.text import shorten

from .block_manager import BlockManager
from .model import Transformer
from .runner import ModelRunner
from .logprobs import TokenLogprobs
from .micro_batch_auto import LayerClock, check_micro_batches, micro_batching
from .sampler import sample_step, skip_draws
from .scheduler import SampledToken, ScheduledSeq, Scheduler, SchedulerConfig
from .sequence import Sequence, Status

log = get_logger("moemesh.attn_node.engine")


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_tokens: int = 32768  # latent cache capacity, in tokens, across all sequences
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    mla_impl: str = "auto"  # auto | naive | absorbed
    prefix_cache: bool = True  # share cached full prompt blocks between requests (attn_node/block_manager.py)
    # >= 2: ping-pong micro-batches so attention overlaps remote experts; "auto": split only when the measured
    # costs say it pays (attn_node/micro_batch_policy.py), re-decided per batch-size bucket
    micro_batches: int | str = "auto"
    # A step whose experts are unreachable waits at most this long for a new placement, and only while one can
    # come (the backend's wait_for_change fails it at once when no placement could host them: _run_model).
    expert_wait_s: float = 30.0


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int | None  # None when the request failed
    finished: bool
    finish_reason: str | None  # "stop" (EOS or a stop token) | "length" (max_tokens) | "error"
    error: MoemeshError | None = None  # why the request failed, typed (servers map it by moemesh.wire.status)
    logprobs: TokenLogprobs | None = None  # when the request's SamplingParams.logprobs is set


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    error: MoemeshError | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token id, when the request asked


class Engine:
    def __init__(self, model: Transformer, cfg: ModelConfig, config: EngineConfig = EngineConfig(), *,
                 backend: ExpertBackend):
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({config.max_num_seqs}), or some running sequences could never be scheduled"
            )
        require_backend(backend)
        if any(_unclocked(moe.backend) is not backend for moe in model.moe_layers()):
            raise ValueError("the model's MoE layers are not attached to this backend: "
                             "call attach_experts(model, backend) first")
        try:
            check_micro_batches(config.micro_batches)
        except ValueError as exc:
            raise ValueError(f"EngineConfig.{exc}") from None
        self.micro = micro_batching(config.micro_batches)  # fixed, or measured and chosen per step
        layers_backend = self.micro.wrap(backend)  # auto: a clock on every MoE layer's dispatch and combine
        for moe in model.moe_layers():
            moe.backend = layers_backend
        self.cfg, self.config, self.backend = cfg, config, backend
        dtype = model.compute_dtype  # the latent cache holds activations
        self.device = model.device  # the cache, the step's inputs and the sampler's generators live there too
        num_blocks = max(1, config.kv_cache_tokens // config.block_size)
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_cache)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, cfg.eos_token_ids), self.blocks
        )
        self.runner = ModelRunner(model, cfg, self.blocks, dtype, config.mla_impl)
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()

    # ---- requests -------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    resumed: int = 0) -> str:
        """Check and queue a request; raise InvalidRequestError saying what to fix.

        ``params`` were checked where the request entered the process (SamplingParams.check); here only
        what the engine alone knows is checked (see :meth:`validate`).

        ``resumed``: how many ids at the end of ``prompt_ids`` an earlier node already sampled for this
        request (a router resuming it after that node failed); a seeded generator skips their draws so
        the random stream goes on where it stopped.
        """
        self.validate(prompt_ids, params)
        if not 0 <= resumed < len(prompt_ids):
            raise InvalidRequestError(f"resumed must be in [0, {len(prompt_ids)}) (the prompt's length), got {resumed}")
        arrival = next(self._arrivals)
        request_id = request_id or f"req-{arrival}"
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {shorten(request_id)!r} is already in use")
        seq = Sequence(request_id, list(prompt_ids), params, arrival)
        if not params.greedy:
            seq.generator = torch.Generator(device=self.device)  # draws happen where the logits are
            if params.seed is not None:
                seq.generator.manual_seed(params.seed)
                skip_draws(seq.generator, self.cfg.vocab_size, resumed)
            else:
                seq.generator.seed()  # fresh entropy, without touching torch's global generator
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """What only the engine can check: the prompt's ids, and its length against context and cache."""
        vocab, context = self.cfg.vocab_size, self.cfg.max_position_embeddings
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: give at least one token")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        total = len(prompt_ids) + params.max_tokens
        if total > context:
            raise InvalidRequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                f"model's context of {context} tokens: shorten the prompt or lower max_tokens"
            )
        need = len(prompt_ids) + params.max_tokens - 1
        if self.blocks.blocks_for(need) > self.blocks.num_blocks:
            raise InvalidRequestError(
                f"this request needs {need} tokens of KV cache but the whole cache holds "
                f"{self.blocks.capacity_tokens}: lower max_tokens or start the engine with a larger cache"
            )

    def abort(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None and seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping -------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        try:
            tokens, logprobs = self._run(scheduled)  # one per sequence whose step reaches its end
        except ExpertBackendError as exc:
            # The step's sequences cannot go on; the others (waiting, or not in this step) can.
            return [self._fail(item.seq, exc) for item in scheduled]
        sampled = self.scheduler.postprocess(scheduled, tokens)  # in sampling order, as the logprobs
        return [self._event(s, lp) for s, lp in zip(sampled, logprobs, strict=True)]

    def _run(self, scheduled: list[ScheduledSeq]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Run the model once and sample a token (and its logprobs, if asked) for every sequence whose step
        reaches its end."""
        m = self.micro.pick(scheduled)
        started = time.perf_counter()
        logits, retried = self._run_model(scheduled, m)  # [n_sampling, vocab]
        sampling = [item.seq for item in scheduled if item.samples]
        out = [], []
        if sampling:
            # The step's one host read (ids and logprobs in one transfer): everything before it stays on the device.
            out = sample_step(logits, [s.params for s in sampling], [s.generator for s in sampling])
        if not retried:  # a step that waited for a placement says nothing about either setting's cost
            self.micro.observe(scheduled, m, time.perf_counter() - started)
        return out

    def _run_model(self, scheduled: list[ScheduledSeq], micro_batches: int = 1) -> tuple[torch.Tensor, bool]:
        """Run the model once; if its experts were unreachable, wait (bounded) for a new placement and re-run.

        The wait rule (``moemesh/control/servability.py``): wait only while a placement that hosts the missing
        experts can come, that is while the live expert nodes have slots for every expert, so the leader is
        re-planning onto them (``degraded``), and at most ``expert_wait_s``. When they have not (``unservable``:
        only a node joining or returning can help, and nobody knows when), the backend's ``wait_for_change``
        raises ExpertsUnservable at once and the step's requests fail now, naming the missing experts, instead
        of every request waiting ``expert_wait_s`` per attempt for a placement that cannot come.

        A re-run computes exactly what the failed run would have: the KV it wrote is written again at the
        same slots (``num_cached`` only advances in postprocess, after success) and nothing was sampled yet.
        Returns the logits and whether the run had to be repeated.
        """
        backend = self.backend
        deadline = time.monotonic() + self.config.expert_wait_s
        generation = backend.begin_step()
        retried = False
        while True:
            self.micro.start_step()
            try:
                return self.runner.run(scheduled, micro_batches=micro_batches), retried
            except ExpertBackendError as exc:
                error = exc
            finally:
                backend.end_step()
            left = deadline - time.monotonic()
            if left <= 0:
                raise error
            log.warning("step_waiting_for_placement", error=str(error), wait_s=round(left, 1),
                        sequences=len(scheduled))
            try:
                changed = backend.wait_for_change(generation, left)  # may raise at once: no placement can come
            except ExpertBackendError as verdict:
                log.warning("step_failed_fast", error=str(verdict), sequences=len(scheduled))
                raise verdict from error
            if not changed:
                raise error
            generation = backend.begin_step()
            retried = True
            log.info("step_retried", generation=generation)

    def _fail(self, seq: Sequence, error: MoemeshError) -> TokenEvent:
        self.scheduler.finish(seq, "error")
        self._seqs.pop(seq.request_id, None)
        return TokenEvent(seq.request_id, None, True, "error", error)

    def _event(self, sampled: SampledToken, logprobs: TokenLogprobs | None) -> TokenEvent:
        finished = sampled.finish_reason is not None
        if finished:
            self._seqs.pop(sampled.seq.request_id, None)
        return TokenEvent(sampled.seq.request_id, sampled.token, finished, sampled.finish_reason, logprobs=logprobs)

    # ---- conveniences ---------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run every prompt to completion as one continuously batched job; outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        for p, sp in zip(prompts, plist):
            self.validate(p, sp)
        outputs = {}
        for p, sp in zip(prompts, plist):
            rid = self.add_request(p, sp)
            outputs[rid] = RequestOutput(rid, list(p), [], None)
        while self.has_unfinished():
            for ev in self.step():
                out = outputs.get(ev.request_id)
                if out is not None:
                    if ev.token_id is not None:
                        out.token_ids.append(ev.token_id)
                    if ev.logprobs is not None:
                        out.logprobs.append(ev.logprobs)
                    out.finish_reason, out.error = ev.finish_reason, ev.error
        return list(outputs.values())

    @torch.inference_mode()
    def prompt_logits(self, prompt_ids: list[int]) -> torch.Tensor:
        """fp32 logits at every prompt position, [L, vocab] (one prefill, cache released after)."""
        params = SamplingParams(max_tokens=1, temperature=0.0)
        self.validate(prompt_ids, params)
        seq = Sequence("prompt-logits", list(prompt_ids), params, -1)
        if not self.blocks.can_reserve(len(prompt_ids)):
            raise InvalidRequestError("the KV cache is busy: no room to score this prompt now")
        self.blocks.reserve(seq, len(prompt_ids))
        self.micro.start_step()  # not a step the choice learns from: its marks are dropped by the next
        try:
            return self.runner.run([ScheduledSeq(seq, len(prompt_ids))], all_logits=True)
        finally:
            self.blocks.free(seq)


def _unclocked(backend):
    """The backend under an earlier engine's LayerClock (an engine rebuilt on the same model), or ``backend``."""
    return backend.inner if isinstance(backend, LayerClock) else backend

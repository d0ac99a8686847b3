"""``moemesh generate``: prompts through the single-process engine, streamed or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from moemesh.argtypes import positive_float
from moemesh.cli import flags
from moemesh.errors import InvalidRequestError
from moemesh.sampling import SamplingParams, flag_name

if TYPE_CHECKING:  # the engine (torch) loads only when a command runs, so `moemesh --help` stays quick
    from moemesh.attn_node.engine import EngineConfig
    from moemesh.model.tokenizer import Tokenizer

DEMO_PROMPT = "The river ran past the old mill and"
EXIT_REQUEST_FAILED = 3  # some request failed while running (e.g. its experts became unavailable)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate from one or more prompts on this machine",
                              description="Run prompts through the single-process engine (attention and every expert in "
                              "this process) as one continuously batched job. Without --json, text streams as it is "
                              "generated, prompt by prompt in order.")
    flags.add_model_arg(p, required=False)
    flags.add_sampling_args(p, several_prompts=True)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt, in order, when done")
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="also give each generated token's logprob and the K (0..20) most likely tokens at its step "
                   "(raw: the log-softmax of the logits, before temperature and filters): in --json objects as "
                   "\"logprobs\", else one line per token after the text")
    p.add_argument("--expert-nodes", action="append", metavar="HOST:PORT=SPEC,...",
                   help="run only the attention side here and send routed experts to these expert nodes "
                   "(SPEC as in `moemesh expert-node --experts`; repeatable). Several nodes may host the same "
                   "experts: rows are split across such replicas, and a lost node's rows go to another replica")
    p.add_argument("--dispatch-timeout", type=positive_float, default=30.0,
                   help="seconds an expert node may take per MoE layer before its rows go to a replica "
                   "(default: 30)")
    flags.add_transport_arg(p, "attn")
    flags.add_engine_args(p)
    return p


def engine_config(args: argparse.Namespace) -> EngineConfig:
    from moemesh.attn_node.engine import EngineConfig

    return EngineConfig(
        block_size=args.block_size,
        kv_cache_tokens=args.kv_cache_tokens,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_batched_tokens,
        micro_batches=args.micro_batches,
        prefix_cache=getattr(args, "prefix_cache", True),
        expert_wait_s=getattr(args, "expert_wait", EngineConfig.expert_wait_s),
    )


def sampling_params(args: argparse.Namespace, n_prompts: int) -> list[SamplingParams]:
    """One checked SamplingParams per prompt (prompt i seeds with --seed + i); errors name the flag."""
    return [
        SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            seed=None if args.seed is None else args.seed + i, ignore_eos=args.ignore_eos,
            logprobs=getattr(args, "logprobs", None),
        ).check(name=flag_name)
        for i in range(n_prompts)
    ]


def _encode(prompts: list[tuple[str, object]], tokenizer: Tokenizer | None) -> list[list[int]]:
    out = []
    for kind, value in prompts:
        if kind == "ids":
            out.append(list(value))
        elif tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer.json: give prompts as --prompt-ids 1,2,3")
        else:
            out.append(tokenizer.encode(value))
    return out


@dataclass
class _Stream:
    """Per-prompt output; text is printed prompt by prompt, in order, as soon as it is that prompt's turn."""

    decoder: object | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    pending: str = ""
    text: str = ""
    finish_reason: str | None = None
    error: Exception | None = None


def run(args: argparse.Namespace) -> int:
    from moemesh.control.placement import parse_expert_nodes
    from moemesh.devices import resolve_device
    from moemesh.launch.embedded import build_local, build_remote, ensure_demo_model

    prompts = getattr(args, "prompts", None) or [("text", DEMO_PROMPT)]
    params = sampling_params(args, len(prompts))  # before any model loads
    resolve_device(args.device)  # likewise: a missing GPU is one line before the demo checkpoint is written
    model_dir = args.model or str(ensure_demo_model())
    if getattr(args, "expert_nodes", None):
        nodes = [node for text in args.expert_nodes for node in parse_expert_nodes(text)]
        mesh = build_remote(model_dir, nodes, args.dtype, engine_config(args), not args.json, args.dispatch_timeout,
                            kernels=args.kernels, transport=args.transport, device=args.device)
    else:
        mesh = build_local(model_dir, args.dtype, engine_config(args), progress=not args.json, kernels=args.kernels,
                           device=args.device, fp8=args.fp8)
    try:
        return _run(args, mesh, prompts, params)
    finally:
        mesh.close()


def _run(args: argparse.Namespace, mesh, prompts, params: list[SamplingParams]) -> int:
    tokenizer = mesh.tokenizer
    prompt_ids = _encode(prompts, tokenizer)
    engine = mesh.engine
    for ids, p in zip(prompt_ids, params):
        engine.validate(ids, p)  # every prompt is checked before any runs
    streams = {}
    order = []
    for ids, p in zip(prompt_ids, params):
        rid = engine.add_request(ids, p)
        streams[rid] = _Stream(tokenizer.incremental_decoder() if tokenizer else None)
        order.append(rid)
    printer = None if args.json else _OrderedPrinter(order, prompts, tokenizer)
    while engine.has_unfinished():
        for ev in engine.step():
            s = streams[ev.request_id]
            if ev.error is not None:
                s.finish_reason, s.error = ev.finish_reason, ev.error
                print(f"moemesh generate: request {order.index(ev.request_id)} failed: {ev.error}", file=sys.stderr)
                if printer:
                    printer.emit(ev.request_id, "", True)
                continue
            s.token_ids.append(ev.token_id)
            if ev.logprobs is not None:
                s.logprobs.append(_logprobs_json(ev.logprobs, tokenizer))
            piece = s.decoder.push(ev.token_id) if s.decoder else f"{ev.token_id} "
            if ev.finished:
                s.finish_reason = ev.finish_reason
                if s.decoder:
                    piece += s.decoder.flush()
            s.text += piece
            if printer:
                printer.emit(ev.request_id, piece, ev.finished)
    if args.json:
        for i, rid in enumerate(order):
            s = streams[rid]
            obj = {"index": i, "prompt_ids": prompt_ids[i], "token_ids": s.token_ids,
                   "finish_reason": s.finish_reason,
                   "usage": {"prompt_tokens": len(prompt_ids[i]), "completion_tokens": len(s.token_ids)}}
            if tokenizer:
                obj["text"] = s.text
            if params[i].logprobs is not None:
                obj["logprobs"] = s.logprobs
            if s.error is not None:
                obj["error"] = str(s.error)
            print(json.dumps(obj))
    elif params and params[0].logprobs is not None:
        for i, rid in enumerate(order):
            for lp in streams[rid].logprobs:
                print(f"[{i}] " + "  ".join(f"{e['token_id']} {e['token']!r} {e['logprob']:.4f}"
                                            for e in [lp, *lp["top"]]))
    return EXIT_REQUEST_FAILED if any(s.error is not None for s in streams.values()) else 0


def _logprobs_json(lp, tokenizer: Tokenizer | None) -> dict:
    """A token's logprobs as --json prints them; ``token`` decoded alone ("" without a tokenizer), as on the wire."""
    def entry(token_id: int, logprob: float) -> dict:
        token = tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else ""
        return {"token_id": token_id, "token": token, "logprob": logprob}

    return {**entry(lp.token_id, lp.logprob), "top": [entry(t, v) for t, v in lp.top]}


class _OrderedPrinter:
    def __init__(self, order: list[str], prompts: list[tuple[str, object]], tokenizer):
        self.order, self.prompts, self.tokenizer = order, prompts, tokenizer
        self.current = 0
        self.buffers = {rid: "" for rid in order}
        self.done = set()
        self._header(0)

    def _header(self, i: int) -> None:
        if i >= len(self.order):
            return
        kind, value = self.prompts[i]
        shown = value if kind == "text" else ",".join(map(str, value))
        sys.stdout.write(f"{'' if i == 0 else chr(10)}[{i}] {shown}")
        sys.stdout.flush()

    def emit(self, rid: str, piece: str, finished: bool) -> None:
        if rid == self.order[self.current]:
            sys.stdout.write(piece)
        else:
            self.buffers[rid] += piece
        if finished:
            self.done.add(rid)
        while self.current < len(self.order) and self.order[self.current] in self.done:
            self.current += 1
            if self.current < len(self.order):
                self._header(self.current)
                nxt = self.order[self.current]
                sys.stdout.write(self.buffers.pop(nxt, ""))
            else:
                sys.stdout.write("\n")
        sys.stdout.flush()

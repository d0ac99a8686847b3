"""``moemesh expert-node``: load a shard of routed experts and serve Dispatch streams until SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys

import torch
from grpc_health.v1 import health_pb2

from moemesh.model.checkpoint import checkpoint_fingerprint
from moemesh.model.config import ModelConfig
from moemesh.errors import UnavailableError
from moemesh.wire.health_port import start_health_port
from moemesh.wire.status import abort
from moemesh.logs import get_logger
from moemesh.control.placement import parse_expert_spec
from moemesh.wire.limits import DEFAULT_MAX_BATCHED_TOKENS

from .loader import default_fused_moe, load_expert_shard
from .server import SERVICE_NAME, TORCH_SERVICE_NAME, DispatchService, dispatch_server, message_limit, shut_down

log = get_logger("moemesh.expert_node")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def serve(model_dir: str, spec: str, host: str, port: int, dtype, drain_timeout_s: float = 30.0,
                tls=None, health_port: int | None = None, transport: str = "grpc", torch_port: int = 0, *,
                device: torch.device | str = "cpu", keep_fp8: bool = False,
                max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS) -> None:
    """``device``: where the experts live and compute (resolved by the caller); ``keep_fp8``: FP8 checkpoints'
    experts stay e4m3 there; ``max_batched_tokens``: the largest step attention nodes send (sizes the message
    limit)."""
    cfg = ModelConfig.from_dir(model_dir)
    limit = message_limit(cfg, max_batched_tokens)
    experts = parse_expert_spec(spec, cfg.moe_layers, cfg.n_routed_experts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # Bind first (health says NOT_SERVING while weights load), so probes see the node at once.
    service = _LazyService()
    server, bound, health_servicer = dispatch_server(service, host, port, tls,
                                                     (TORCH_SERVICE_NAME,) if transport == "torch" else (),
                                                     max_message_bytes=limit)
    torch_transport = None
    if transport == "torch":  # TorchTransport sessions beside ExpertDispatch (the fallback)
        from moemesh.control.node_ids import advertise_address

        from .torch_server import attach

        torch_transport = attach(server, lambda: service._service, advertise_address(host, 0).rpartition(":")[0],
                                 torch_port, device)
    await server.start()
    health_server = await start_health_port(health_servicer, host, health_port)  # noqa: F841 (kept alive)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, NOT_SERVING)
    log.info("loading_experts", layers=len(experts), experts=sum(len(v) for v in experts.values()), port=bound,
             device=str(device), fp8_kept=keep_fp8 and cfg.quant is not None, threads=torch.get_num_threads())
    shard = await asyncio.to_thread(load_expert_shard, model_dir, cfg, experts, dtype, sys.stderr.isatty(),
                                    default_fused_moe(device), device=device, keep_fp8=keep_fp8)
    if stop.is_set():  # told to stop while loading: never announce SERVING
        await server.stop(grace=None)
        log.info("stopped", reason="signal during load")
        return
    service.attach(DispatchService(shard, cfg, checkpoint_fingerprint(model_dir), limit))
    # What loading built lives as long as the process: out of every later full collection (as vLLM
    # does). Unfrozen, one gen-2 pass over it took ~190 ms, the slowest hop of a first round.
    gc.collect()
    gc.freeze()
    log.info("experts_loaded", bytes=shard.nbytes())
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, SERVING)
    log.info("serving", host=host, port=bound)
    print(json.dumps({"event": "ready", "port": bound}), flush=True)

    await stop.wait()
    log.info("draining", in_flight=service.in_flight)
    await shut_down(server, service, health_servicer, drain_timeout_s, torch_transport)
    log.info("stopped")


class _LazyService:
    """Answers UNAVAILABLE until the shard is loaded, then delegates to the real service."""

    def __init__(self):
        self._service: DispatchService | None = None

    def attach(self, service: DispatchService) -> None:
        self._service = service

    @property
    def in_flight(self) -> int:
        return self._service.in_flight if self._service else 0

    def drain(self) -> None:
        if self._service:
            self._service.drain()

    async def Dispatch(self, request_iterator, context):
        if self._service is None:
            await abort(context, UnavailableError("experts are still loading; retry when health is SERVING"))
        async for resp in self._service.Dispatch(request_iterator, context):
            yield resp

    async def Info(self, request, context):
        if self._service is None:
            await abort(context, UnavailableError("experts are still loading"))
        return await self._service.Info(request, context)

"""``moemesh plan --cluster``: predict or size a mesh with the cluster model (``moemesh/cluster_model.py``).

With ``--attention-nodes``, ``--expert-nodes`` and ``--batch`` it predicts that shape; whatever is left out (or
``--tpot-ms``) is searched: the shape with the most tokens/s per node within the TPOT. Costs come from
``--profile FILE`` (``moemesh profile --json``) or ``--hardware H800|H200|B200`` (published figures, one GPU
per node: ``moemesh/hardware.py``, sources in docs/cluster-model.md).
"""

from __future__ import annotations

import argparse
import json

from moemesh.argtypes import positive_float, positive_int
from moemesh.cluster_model import (ClusterShape, MeasuredProfile, ModelError, ModelShape, Prediction, predict,
                                   recommend)

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NODES = range(1, 33)
MICRO_BATCHES = (1, 2, 3, 4)


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster model (--cluster)")
    g.add_argument("--cluster", action="store_true",
                   help="instead of a placement: predict tokens/s, TPOT and utilisation of a mesh (or recommend "
                   "one) from --model's config and --profile or --hardware")
    g.add_argument("--model", metavar="DIR", help="the model directory (its config.json is read)")
    g.add_argument("--profile", metavar="FILE", help="costs measured by `moemesh profile --json`")
    g.add_argument("--hardware", metavar="NAME", help="instead of --profile: a preset, H800, H200 or B200")
    g.add_argument("--transport", default="grpc", help="with --profile: whose hop times to use (default: grpc)")
    g.add_argument("--attention-nodes", type=positive_int, metavar="A", help="attention nodes (default: search)")
    g.add_argument("--expert-nodes", type=positive_int, metavar="N", help="expert nodes (default: search)")
    g.add_argument("--batch", type=positive_int, metavar="B", help="sequences per attention node (default: search)")
    g.add_argument("--context", type=positive_int, default=1024, metavar="C",
                   help="mean context tokens per sequence over the decode (default: 1024)")
    g.add_argument("--micro-batches", type=positive_int, metavar="M", help="ping-pong micro-batches (default: search)")
    g.add_argument("--tpot-ms", type=positive_float, metavar="T", help="TPOT bound for the search, ms")
    g.add_argument("--shared-host", action="store_true",
                   help="every node process on this one host's cores, as `moemesh bench --mesh` runs them: "
                   "micro-batches then do not overlap the round trip, which comes from the profile's measured "
                   "MoE-layer round trips (1 attention + 2 expert nodes) where it has them "
                   "(scripts/calibrate-cluster-model.sh)")


def _costs(args):
    from moemesh.model.config import ModelConfig

    if not args.model:
        raise ModelError("--cluster needs --model DIR (its config.json gives layers, experts and sizes)")
    cfg = ModelConfig.from_dir(args.model)
    if bool(args.profile) == bool(args.hardware):
        raise ModelError("--cluster needs one of --profile FILE (moemesh profile --json) or --hardware NAME")
    if args.hardware:
        from moemesh.hardware import preset

        return preset(args.hardware, cfg)
    try:
        with open(args.profile, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read --profile {args.profile}: {exc}") from None
    act = float(data.get("model", {}).get("act_bytes", 2)) if isinstance(data, dict) else 2.0
    shape = ModelShape(cfg.num_hidden_layers, len(cfg.moe_layers), cfg.hidden_size, cfg.num_experts_per_tok,
                       cfg.n_routed_experts, act)
    return MeasuredProfile.from_json(data, args.transport), shape


def cluster(args: argparse.Namespace) -> dict:
    """The prediction for the shape the flags give, searching what they leave out (ModelError on bad input)."""
    profile, model = _costs(args)
    fixed = (args.attention_nodes, args.expert_nodes, args.batch, args.micro_batches)
    if all(v is not None for v in fixed) and args.tpot_ms is None:
        misfit = getattr(profile, "misfit", None)
        reason = misfit and misfit(model, ClusterShape(*fixed[:3], args.context, fixed[3]))
        if reason:
            raise ModelError(f"this shape does not fit in memory: {reason}")
        p = predict(profile, model, ClusterShape(args.attention_nodes, args.expert_nodes, args.batch, args.context,
                                                 args.micro_batches, getattr(args, "shared_host", False)))
    else:
        if getattr(args, "shared_host", False):
            raise ModelError("--shared-host predicts one given shape (--attention-nodes, --expert-nodes, --batch, "
                             "--micro-batches without --tpot-ms): it describes a test mesh, not one to size")
        p = recommend(profile, model, context=args.context, tpot_ms=args.tpot_ms,
                      attention_nodes=[args.attention_nodes] if args.attention_nodes else NODES,
                      expert_nodes=[args.expert_nodes] if args.expert_nodes else NODES,
                      batches=[args.batch] if args.batch else BATCHES,
                      micro_batches=[args.micro_batches] if args.micro_batches else MICRO_BATCHES)
        if p is None:
            raise ModelError(f"no shape in the search meets --tpot-ms {args.tpot_ms}: allow a longer TPOT or "
                             "fix fewer of the counts")
    return p.to_json()


def format_prediction(data: dict) -> str:
    s = data["shape"]
    p = Prediction(ClusterShape(**s), **{k: v for k, v in data.items() if k != "shape"})
    return "\n".join([
        f"{s['attention_nodes']} attention : {s['expert_nodes']} expert nodes, batch {s['batch']} per attention "
        f"node, context {s['context']}, {s['micro_batches']} micro-batches"
        + (", every process on one host" if s.get("shared_host") else ""),
        f"tokens/s {p.tokens_per_s:.1f}, TPOT {p.tpot_ms:.3f} ms ({p.bound} bound: layer {p.layer_us:.1f} us)",
        f"per layer: attention {p.attention_us:.1f} us, experts {p.expert_us:.1f} us, round trip {p.hop_us:.1f} us",
        f"utilisation: attention {p.attention_utilisation:.0%}, experts {p.expert_utilisation:.0%}; "
        f"micro-batches to hide communication (MegaScale-Infer m >= 2(1 + Tc/Tf)): {p.min_micro_batches}",
    ])

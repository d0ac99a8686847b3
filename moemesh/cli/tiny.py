"""``moemesh tiny-checkpoint``: a small random HF-format DeepSeek checkpoint, for tests and demos."""

from __future__ import annotations

import argparse
import json

from moemesh.argtypes import positive_int
from moemesh.cli.flags import UsageError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tiny-checkpoint", help="write a small random DeepSeek checkpoint (for tests and demos)",
                              description="Write a small random HF-format DeepSeek checkpoint (config.json, "
                              "model.safetensors, tokenizer.json, tokenizer_config.json with a DeepSeek-style chat template) that "
                              "transformers itself loads.")
    p.add_argument("dir", metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--arch", default="deepseek_v2", choices=["deepseek_v2", "deepseek_v3", "deepseek_v32"],
                   help="V2: softmax greedy routing, no q_lora_rank; V3: sigmoid noaux_tc routing with groups and "
                   "correction bias, q_lora_rank set; V3.2: V3 plus DeepSeek Sparse Attention's indexer "
                   "(index_topk 16) (default: deepseek_v2)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes identical files")
    p.add_argument("--hidden-size", type=positive_int, default=128, help="hidden size D (default: 128)")
    p.add_argument("--layers", type=positive_int, default=3, help="decoder layers; the first is dense (default: 3)")
    p.add_argument("--experts", type=positive_int, default=16, help="routed experts per MoE layer (default: 16)")
    p.add_argument("--experts-per-token", type=positive_int, default=4, help="top-k experts per token (default: 4)")
    p.add_argument("--shared-experts", type=int, default=1, help="shared experts per MoE layer (default: 1)")
    p.add_argument("--kv-lora-rank", type=positive_int, default=32, help="MLA latent size C (default: 32)")
    p.add_argument("--vocab-size", type=positive_int, default=512, help="vocabulary size (default: 512)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="stored weight dtype (default: float32)")
    p.add_argument("--chat-template", default="deepseek-v3", choices=["deepseek-v3", "deepseek-r1", "none"],
                   help="tokenizer_config.json's chat template, shaped like DeepSeek-V3's, or DeepSeek-R1's (its "
                   "generation prompt opens <think>, for --reasoning-parser deepseek-r1) (default: deepseek-v3)")
    return p


def run(args: argparse.Namespace) -> int:
    from moemesh.model.tiny import write_tiny_checkpoint

    if args.shared_experts < 0:
        raise UsageError(f"--shared-experts must be >= 0, got {args.shared_experts}")
    if args.experts_per_token > args.experts:
        raise UsageError(f"--experts-per-token ({args.experts_per_token}) exceeds --experts ({args.experts})")
    path = write_tiny_checkpoint(
        args.dir, arch=args.arch, seed=args.seed, hidden_size=args.hidden_size, layers=args.layers,
        experts=args.experts, experts_per_token=args.experts_per_token, shared_experts=args.shared_experts,
        kv_lora_rank=args.kv_lora_rank, vocab_size=args.vocab_size, dtype=args.dtype,
        chat_template=None if args.chat_template == "none" else args.chat_template,
    )
    print(json.dumps({"path": str(path)}))
    return 0

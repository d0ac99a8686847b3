"""Oracle parity on a device: the single-process engine against transformers, both on the same GPU.

    python scripts/gpu_parity.py [--device cuda] [--configs NAME,...] [--kernels auto|triton|reference]

For each of tests/oracle/hf_models.py's configs (V2 and V3 routing, YaRN, q_lora on and off, tied
embeddings...), transformers writes the checkpoint and moemesh loads it, then on ``--device``:
  fp32  greedy tokens of 3 prompts batched together must equal transformers' exactly;
  bf16  prefill logits against transformers-fp32: the median position's error within twice
        transformers-bf16's own (or 1% of the largest logit), and positions where a bf16 routing near-tie
        picked another expert (error > 10x transformers-bf16's median) no more than twice transformers-bf16's
        count (or 10% of positions): bf16 may round differently, not worse.
Prints one labelled line per config and check; exit 1 if any failed. Runs on ``--device cpu`` too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpu_common import device_kwargs

from moemesh.attn_node.engine import EngineConfig
from moemesh.launch.embedded import build_local
from moemesh.sampling import SamplingParams
from tests.oracle.hf_models import CONFIGS, save_hf_model

PROMPT_LENGTHS = (5, 13, 30)
# Small blocks and a small step budget, as the oracle test uses: block tables and chunked prefill run.
ENGINE = EngineConfig(block_size=4, max_num_batched_tokens=24, max_num_seqs=8)


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _hf_tokens(hf, prompt: list[int], new_tokens: int, device: str) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt], device=device), do_sample=False, max_new_tokens=new_tokens,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _hf_logits(hf, prompt: list[int], device: str) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt], device=device)).logits[0].float().cpu()  # [L, vocab]


def check_config(name: str, path: Path, args) -> list[tuple[str, bool, str]]:
    from transformers import AutoModelForCausalLM

    hf32 = save_hf_model(name, path).to(args.device)
    results = []
    mesh = build_local(path, "float32", ENGINE, False, args.kernels, **device_kwargs(build_local, args.device))
    prompts = _prompts(mesh.cfg.vocab_size)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    ours = [o.token_ids for o in mesh.engine.generate(prompts, params)]
    ref = [_hf_tokens(hf32, p, args.new_tokens, args.device) for p in prompts]
    same = sum(a == b for a, b in zip(ours, ref))
    results.append(("fp32 greedy tokens", same == len(prompts), f"{same}/{len(prompts)} prompts identical "
                    f"({args.new_tokens} tokens each)"))
    mesh.close()

    mesh16 = build_local(path, "bfloat16", ENGINE, False, args.kernels, **device_kwargs(build_local, args.device))
    hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(args.device).eval()
    ours_err, hf_err, scale = [], [], 0.0  # per prompt position: the largest |logit error| over the vocabulary
    for prompt in prompts:
        ref32 = _hf_logits(hf32, prompt, args.device)
        hf_err.append((_hf_logits(hf16, prompt, args.device) - ref32).abs().amax(-1))
        ours_err.append((mesh16.engine.prompt_logits(prompt).float().cpu() - ref32).abs().amax(-1))
        scale = max(scale, ref32.abs().max().item())
    ours_err, hf_err = torch.cat(ours_err), torch.cat(hf_err)  # [positions]
    # A bf16 near-tie in routing can pick another expert at a few positions (transformers-bf16 does too, at
    # others): there the error is large for both. So: the typical (median) position within twice
    # transformers' own, and no more such routing flips than twice transformers' (or 10% of positions).
    ours_med, hf_med = ours_err.median().item(), hf_err.median().item()
    bound = max(2 * hf_med, 0.01 * scale)
    flips = lambda err: int((err > 10 * max(hf_med, 1e-6)).sum())  # noqa: E731
    ours_flips, hf_flips = flips(ours_err), flips(hf_err)
    flip_bound = max(2 * hf_flips, -(-len(ours_err) // 10))
    ok = ours_med <= bound and ours_flips <= flip_bound
    results.append(("bf16 prefill logits", ok,
                    f"median position error vs hf_fp32: moemesh {ours_med:.4f}, hf_bf16 {hf_med:.4f} (bound "
                    f"{bound:.4f}); routing flips (> 10x): moemesh {ours_flips}, hf_bf16 {hf_flips} of "
                    f"{len(ours_err)} positions (bound {flip_bound}); worst: moemesh {ours_err.max():.3f}, "
                    f"hf_bf16 {hf_err.max():.3f}; max |logit| {scale:.1f}"))
    mesh16.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_parity.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default: cuda)")
    p.add_argument("--configs", default=",".join(sorted(CONFIGS)), help="comma-separated names from "
                   "tests/oracle/hf_models.py (default: all)")
    p.add_argument("--kernels", default="auto", choices=["auto", "triton", "reference"])
    p.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per prompt (default: 24)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_parity: no CUDA device visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    failed = 0
    print(f"oracle parity on {args.device} (kernels {args.kernels}), transformers on the same device")
    with tempfile.TemporaryDirectory(prefix="moemesh-parity-") as tmp:
        for name in names:
            start = time.perf_counter()
            try:
                results = check_config(name, Path(tmp) / name, args)
            except Exception as exc:  # one config's crash is that config's FAIL, the rest still run
                results = [("run", False, f"{type(exc).__name__}: {exc}")]
            for what, ok, detail in results:
                failed += not ok
                print(f"  {name:<24} {what:<20} {'ok  ' if ok else 'FAIL'} {detail}")
            print(f"  {name:<24} {'seconds':<20}      {time.perf_counter() - start:.1f}")
    print(f"parity: {'every check passed' if not failed else f'{failed} check(s) FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

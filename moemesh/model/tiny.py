"""Small random DeepSeek-V2/V3 checkpoints in the published HF layout, for tests and demos.

Real checkpoints are tens to hundreds of GB and cannot be downloaded here, so tests
build a tiny one with every tensor name and shape transformers expects, load it in
both moemesh and transformers (the oracle), and compare. Deliberately written without
importing transformers: that is a test-only dependency.

Weights are seeded and spread (std ``1/sqrt(fan_in)``, norms ``1 + noise``, a router
and lm_head a little sharper) so logits and routing scores are well separated: greedy
tokens and top-k experts then do not flip on fp32 rounding differences between
implementations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from moemesh.model.config import ModelConfig
from moemesh.model.tiny_templates import CHAT_TEMPLATES, CHAT_TOKENS

BOS, EOS = "<s>", "</s>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Training text for the byte-level BPE: fixed, so the vocabulary is the same on every machine.
_CORPUS = """\
The river ran past the old mill and under the stone bridge, where the children of the
village stood every morning to watch the water. In spring it was fast and brown with
snow from the hills; in summer it was slow and clear, and you could see the fish
turning in the shallows. The miller said the river had run the same way for a thousand
years, and that it would run the same way for a thousand more, long after the mill had
fallen down and the bridge had been carried away.
A model that reads text turns it into numbers first. Each word is split into pieces,
and each piece has a number. Common words are a single piece; rare words are several.
The model reads the numbers, thinks about them layer by layer, and writes the next
number, one at a time, until it decides to stop. Then the numbers are turned back into
text, and the answer appears on the screen, word by word, as if someone were typing.
Mixture of experts models keep many small feed forward networks, called experts, in
every layer. A router looks at each token and sends it to a few of them, so most of the
model is idle for any one token. This makes a very large model cheap to run, if the
experts can be spread over many machines and the tokens sent to them quickly.
On Monday the weather was cold and grey. On Tuesday it rained all day, and the streets
were full of water. On Wednesday the sun came out, and everyone went to the park to sit
on the grass and read, talk, eat, and sleep. By Thursday it was cold again, and by
Friday nobody could remember the sun at all. Such is the weather in the north.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve,
twenty, thirty, forty, fifty, hundred, thousand, million. 0 1 2 3 4 5 6 7 8 9 10 42 100.
Questions: what, where, when, why, who, how? Answers: here, there, now, then, because.
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE with exactly ``vocab_size`` ids: ``<s>``=0, ``</s>``=1, 256 bytes, merges, chat tokens.

    Its post-processor prepends ``<s>``, as DeepSeek's tokenizer.json does. The chat
    templates' tokens (``<｜User｜>``, ``<think>``, ...) follow the merges as added, not
    special, tokens, as in DeepSeek's. If the corpus runs out of merges first,
    ``<extra_N>`` special tokens fill the vocabulary.
    """
    least = 2 + 256 + len(CHAT_TOKENS)
    if vocab_size < least:
        raise ValueError(f"vocab_size must be >= {least} (2 special tokens + 256 bytes + {len(CHAT_TOKENS)} chat "
                         f"tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_TOKENS),
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    tok.add_tokens(list(CHAT_TOKENS))
    have = tok.get_vocab_size(with_added_tokens=True)
    if have < vocab_size:
        tok.add_special_tokens([f"<extra_{i}>" for i in range(vocab_size - have)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def _groups(experts: int, k: int) -> tuple[int, int]:
    """V3 ``(n_group, topk_group)``: 4 groups choosing 2 when experts allow, else fewer."""
    for n_group in (4, 2, 1):
        per_group = experts // n_group
        if experts % n_group or per_group < 2:
            continue
        topk_group = max(1, n_group // 2)
        while topk_group * per_group < k:
            topk_group += 1
        return n_group, topk_group
    return 1, 1


TINY_ARCHS = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
_HF_CLASSES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
               "deepseek_v32": "DeepseekV32ForCausalLM"}


def tiny_config_dict(
    *,
    arch: str = "deepseek_v2",
    hidden_size: int = 128,
    layers: int = 3,
    experts: int = 16,
    experts_per_token: int = 4,
    shared_experts: int = 1,
    kv_lora_rank: int = 32,
    vocab_size: int = 512,
    dtype: str = "float32",
) -> dict[str, Any]:
    """config.json contents in the published DeepSeek layout (``rope_scaling``, ``torch_dtype``)."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {', '.join(TINY_ARCHS)}, got {arch!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    v32 = arch == "deepseek_v32"
    v3 = arch == "deepseek_v3" or v32
    n_group, topk_group = _groups(experts, experts_per_token) if v3 else (1, 1)
    cfg: dict[str, Any] = {
        "model_type": arch,
        "architectures": [_HF_CLASSES[arch]],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "moe_intermediate_size": max(8, hidden_size // 2),
        "num_hidden_layers": layers,
        "num_attention_heads": max(2, hidden_size // 64),
        "num_key_value_heads": max(2, hidden_size // 64),
        "q_lora_rank": hidden_size // 2 if v3 else None,
        "kv_lora_rank": kv_lora_rank,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": experts,
        "n_shared_experts": shared_experts,
        "num_experts_per_tok": experts_per_token,
        "topk_method": "noaux_tc" if v3 else "greedy",
        "scoring_func": "sigmoid" if v3 else "softmax",
        "n_group": n_group,
        "topk_group": topk_group,
        "norm_topk_prob": v3,
        "routed_scaling_factor": 2.5 if v3 else 1.0,
        "first_k_dense_replace": 1 if layers > 1 else 0,
        "moe_layer_freq": 1,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 2048,
        "bos_token_id": 0,  # ids of <s> and </s> in build_tokenizer
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "initializer_range": 0.02,
    }
    if v3 and not v32:
        cfg["rope_interleave"] = True
    # The indexer: fewer, narrower heads than DeepSeek's 64 x 128 and a top-k prompts exceed. 16 heads, so an
    # exact-zero score (every head's relu 0, a tie top-k may break either way) is rare.
    if v32:
        cfg.update(index_topk=16, index_n_heads=16, index_head_dim=32)
    return cfg


def _weight_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor transformers' DeepseekV2/V3/V32ForCausalLM saves, with its shape."""
    h, heads = c.hidden_size, c.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        a = p + "self_attn."
        if c.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (heads * c.qk_head_dim, h)
        else:
            shapes[a + "q_a_proj.weight"] = (c.q_lora_rank, h)
            shapes[a + "q_a_layernorm.weight"] = (c.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (heads * c.qk_head_dim, c.q_lora_rank)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (c.kv_lora_rank + c.qk_rope_head_dim, h)
        shapes[a + "kv_a_layernorm.weight"] = (c.kv_lora_rank,)
        shapes[a + "kv_b_proj.weight"] = (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        shapes[a + "o_proj.weight"] = (h, heads * c.v_head_dim)
        if c.has_indexer:
            x = a + "indexer."
            shapes[x + "wq_b.weight"] = (c.index_n_heads * c.index_head_dim, c.q_lora_rank)
            shapes[x + "wk.weight"] = (c.index_head_dim, h)
            shapes[x + "k_norm.weight"] = (c.index_head_dim,)
            shapes[x + "k_norm.bias"] = (c.index_head_dim,)
            shapes[x + "weights_proj.weight"] = (c.index_n_heads, h)
        m = p + "mlp."
        if not c.is_moe_layer(i):
            shapes.update(_mlp_shapes(m, h, c.intermediate_size))
            continue
        shapes[m + "gate.weight"] = (c.n_routed_experts, h)
        if c.arch in ("deepseek_v3", "deepseek_v32"):
            shapes[m + "gate.e_score_correction_bias"] = (c.n_routed_experts,)
        for e in range(c.n_routed_experts):
            shapes.update(_mlp_shapes(f"{m}experts.{e}.", h, c.moe_intermediate_size))
        if c.n_shared_experts:
            shapes.update(_mlp_shapes(m + "shared_experts.", h, c.moe_intermediate_size * c.n_shared_experts))
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "gate_proj.weight": (inter, hidden),
        prefix + "up_proj.weight": (inter, hidden),
        prefix + "down_proj.weight": (hidden, inter),
    }


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("e_score_correction_bias"):
        return 0.05 * noise  # comparable to sigmoid score gaps, so selection depends on it
    if name.endswith("k_norm.bias"):  # the indexer's LayerNorm bias
        return 0.1 * noise
    if len(shape) == 1:  # RMSNorm weights
        return 1.0 + 0.1 * noise
    if name == "model.embed_tokens.weight":
        return noise
    gain = 2.0 if name == "lm_head.weight" or name.endswith("mlp.gate.weight") else 1.0
    return noise * (gain / shape[1] ** 0.5)


def write_tiny_checkpoint(
    out_dir: str | Path,
    *,
    arch: str = "deepseek_v2",
    seed: int = 0,
    hidden_size: int = 128,
    layers: int = 3,
    experts: int = 16,
    experts_per_token: int = 4,
    shared_experts: int = 1,
    kv_lora_rank: int = 32,
    vocab_size: int = 512,
    dtype: str = "float32",
    chat_template: str | None = "deepseek-v3",
    **overrides: Any,
) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json to ``out_dir``.

    ``overrides`` replace config.json keys after the defaults (e.g. ``rope_scaling``,
    ``q_lora_rank``, ``topk_method``); the result must parse as a :class:`ModelConfig`
    and tensor shapes follow it. The same arguments and seed give identical files.
    ``chat_template``: "deepseek-v3" or "deepseek-r1" (see moemesh.model.tiny_templates), or None for none.
    transformers builds shared experts unconditionally and ignores ``moe_layer_freq``,
    so keep ``shared_experts >= 1`` and ``moe_layer_freq=1`` for checkpoints the oracle loads.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = tiny_config_dict(
        arch=arch, hidden_size=hidden_size, layers=layers, experts=experts, experts_per_token=experts_per_token,
        shared_experts=shared_experts, kv_lora_rank=kv_lora_rank, vocab_size=vocab_size, dtype=dtype,
    )
    cfg_dict.update(overrides)
    cfg = ModelConfig.from_dict(cfg_dict)  # raises ConfigError naming a bad override
    if chat_template is not None and chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)} or None, got {chat_template!r}")

    tok = build_tokenizer(cfg.vocab_size)
    cfg_dict.setdefault("bos_token_id", tok.token_to_id(BOS))
    cfg_dict.setdefault("eos_token_id", tok.token_to_id(EOS))

    gen = torch.Generator().manual_seed(seed)
    store_dtype = _DTYPES[cfg.dtype]
    tensors = {}
    for name, shape in _weight_shapes(cfg).items():
        t = _init(name, shape, gen)
        tensors[name] = t if name.endswith("e_score_correction_bias") else t.to(store_dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
               "add_bos_token": True, "add_eos_token": False, "model_max_length": cfg.max_position_embeddings}
    if chat_template is not None:
        tok_cfg["chat_template"] = CHAT_TEMPLATES[chat_template]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return out

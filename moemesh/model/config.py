"""Model configuration read from a Hugging Face DeepSeek-V2/V3/V3.2 ``config.json``.

Two layouts exist in the wild and both load:

* the published DeepSeek one: ``rope_scaling`` (YaRN), ``rope_theta``,
  ``topk_method``, ``scoring_func``, ``torch_dtype``;
* transformers 5's: ``rope_parameters`` (with ``rope_theta`` inside) and ``dtype``;
  its V3 config omits ``topk_method``/``scoring_func`` (V3 routing is implied).

Only fields that change the math are kept. Invalid or unsupported values raise
:class:`ConfigError` naming the field, so a user knows what to fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config.json value that moemesh cannot serve; the message names the field."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension (DeepSeek's ``rope_scaling`` with ``type: yarn``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None


@dataclass(frozen=True)
class QuantConfig:
    """FP8 e4m3 weights with one fp32 ``weight_scale_inv`` per block."""

    block_size: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    topk_method: str
    scoring_func: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    moe_layer_freq: int
    rms_norm_eps: float
    rope_theta: float
    rope_interleave: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    yarn: YarnScaling | None = None
    # DeepSeek Sparse Attention (V3.2's lightning indexer); index_topk 0 = no indexer (V2/V3).
    index_topk: int = 0
    index_n_heads: int = 0
    index_head_dim: int = 0
    quant: QuantConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived sizes -------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the latent ``c_kv`` plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        return self.index_topk > 0

    @property
    def index_cache_dim(self) -> int:
        """Values the indexer caches per token per layer (its one key, beside the latent); 0 without one."""
        return self.index_head_dim if self.has_indexer else 0

    @property
    def cache_row_dim(self) -> int:
        """One paged-cache row per token per layer: [c_kv | k_pe | indexer key]."""
        return self.kv_cache_dim + self.index_cache_dim

    @property
    def mha_cache_dim(self) -> int:
        """What plain multi-head attention would cache per token per layer (K and V of every head)."""
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            m = yarn_get_mscale(self.yarn.factor, self.yarn.mscale_all_dim)
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_id >= self.first_k_dense_replace
            and layer_id % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    # ---- loading -------------------------------------------------------
    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise ConfigError(f"model directory {model_dir} does not exist")
        if not path.is_file():
            raise ConfigError(f"{path} not found: a model directory needs an HF config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return _parse(d)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---- parsing helpers ---------------------------------------------------


def _get(d: dict, name: str, kind: type, default: Any = ..., *, minimum: float | None = None, nullable=False):
    if name not in d or (d[name] is None and not nullable):
        if default is ...:
            raise ConfigError(f"config.json: missing required field '{name}'")
        return default
    value = d[name]
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config.json: field '{name}' must be {kind.__name__}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config.json: field '{name}' must be >= {minimum}, got {value!r}")
    return value


def _choice(d: dict, name: str, choices: tuple[str, ...], default: str) -> str:
    value = d.get(name) or default
    if value not in choices:
        raise ConfigError(f"config.json: field '{name}' is {value!r}; supported: {', '.join(choices)}")
    return value


def _parse_rope(d: dict) -> tuple[float, YarnScaling | None]:
    # transformers 5 nests rope_theta inside rope_parameters; DeepSeek's layout keeps it top level.
    params = d.get("rope_parameters")
    if params is None:
        params = d.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError("config.json: field 'rope_scaling'/'rope_parameters' must be an object or null")
    params = dict(params or {})
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"config.json: field 'rope_theta' must be a positive number, got {theta!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "yarn":
        raise ConfigError(f"config.json: rope type {rope_type!r} is not supported; moemesh supports default and yarn")
    max_pos = _get(d, "max_position_embeddings", int, 4096, minimum=1)
    yarn = YarnScaling(
        factor=_get(params, "factor", float, minimum=1.0),
        original_max_position_embeddings=_get(params, "original_max_position_embeddings", int, max_pos, minimum=1),
        beta_fast=_get(params, "beta_fast", float, 32.0),
        beta_slow=_get(params, "beta_slow", float, 1.0),
        mscale=_get(params, "mscale", float, 1.0),
        mscale_all_dim=_get(params, "mscale_all_dim", float, 0.0),
        attention_factor=_get(params, "attention_factor", float, None),
    )
    return float(theta), yarn


def _parse_quant(d: dict) -> QuantConfig | None:
    q = d.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config.json: quantization_config.quant_method {method!r} is not supported; only fp8")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"config.json: quantization_config.fmt {fmt!r} is not supported; only e4m3")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"config.json: quantization_config.weight_block_size must be [rows, cols], got {block!r}")
    return QuantConfig(block_size=(block[0], block[1]))


def _eos_ids(d: dict) -> tuple[int, ...]:
    eos = d.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    if isinstance(eos, list) and all(isinstance(e, int) for e in eos):
        return tuple(eos)
    raise ConfigError(f"config.json: field 'eos_token_id' must be an int or a list of ints, got {eos!r}")


def _parse_indexer(d: dict) -> dict[str, int]:
    """V3.2's indexer fields, with transformers' DeepseekV32Config defaults."""
    return dict(
        index_topk=_get(d, "index_topk", int, 2048, minimum=1),
        index_n_heads=_get(d, "index_n_heads", int, 64, minimum=1),
        index_head_dim=_get(d, "index_head_dim", int, 128, minimum=1),
    )


def _parse(d: dict[str, Any]) -> ModelConfig:
    if not isinstance(d, dict):
        raise ConfigError("config.json must hold a JSON object")
    arch = d.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(
            f"config.json: model_type is {arch!r}; moemesh serves DeepSeek models ({', '.join(SUPPORTED_ARCHS)})"
        )
    v32 = arch == "deepseek_v32"
    v3 = arch == "deepseek_v3" or v32  # V3.2 keeps V3's MLA, routing and MoE
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {d['hidden_act']!r} is not supported; DeepSeek uses silu")
    if d.get("attention_bias", False):
        raise ConfigError("config.json: attention_bias=true is not supported (DeepSeek checkpoints have none)")
    if d.get("mlp_bias", False):
        raise ConfigError("config.json: mlp_bias=true is not supported (DeepSeek checkpoints have none)")
    rope_theta, yarn = _parse_rope(d)
    n_experts = _get(d, "n_routed_experts", int, 0, minimum=0)
    cfg = ModelConfig(
        arch=arch,
        vocab_size=_get(d, "vocab_size", int, minimum=1),
        hidden_size=_get(d, "hidden_size", int, minimum=1),
        intermediate_size=_get(d, "intermediate_size", int, minimum=1),
        moe_intermediate_size=_get(d, "moe_intermediate_size", int, 1, minimum=1),
        num_hidden_layers=_get(d, "num_hidden_layers", int, minimum=1),
        num_attention_heads=_get(d, "num_attention_heads", int, minimum=1),
        q_lora_rank=_get(d, "q_lora_rank", int, None, minimum=1, nullable=True),
        kv_lora_rank=_get(d, "kv_lora_rank", int, minimum=1),
        qk_nope_head_dim=_get(d, "qk_nope_head_dim", int, minimum=1),
        qk_rope_head_dim=_get(d, "qk_rope_head_dim", int, minimum=2),
        v_head_dim=_get(d, "v_head_dim", int, minimum=1),
        n_routed_experts=n_experts,
        n_shared_experts=_get(d, "n_shared_experts", int, 0, minimum=0) or 0,
        num_experts_per_tok=_get(d, "num_experts_per_tok", int, 1 if n_experts else 0, minimum=0),
        topk_method=_choice(d, "topk_method", TOPK_METHODS, "noaux_tc" if v3 else "greedy"),
        scoring_func=_choice(d, "scoring_func", SCORING_FUNCS, "sigmoid" if v3 else "softmax"),
        n_group=_get(d, "n_group", int, 1, minimum=1),
        topk_group=_get(d, "topk_group", int, 1, minimum=1),
        norm_topk_prob=bool(d.get("norm_topk_prob", v3)),
        routed_scaling_factor=_get(d, "routed_scaling_factor", float, 1.0),
        first_k_dense_replace=_get(d, "first_k_dense_replace", int, 0, minimum=0),
        moe_layer_freq=_get(d, "moe_layer_freq", int, 1, minimum=1),
        rms_norm_eps=_get(d, "rms_norm_eps", float, 1e-6),
        rope_theta=rope_theta,
        # transformers' V2 and V3.2 always rotate interleaved pairs; V3 configs say which.
        rope_interleave=bool(d.get("rope_interleave", True)) if v3 and not v32 else True,
        max_position_embeddings=_get(d, "max_position_embeddings", int, 4096, minimum=1),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        dtype=_choice(d, "dtype" if d.get("dtype") else "torch_dtype", DTYPES, "bfloat16"),
        bos_token_id=_get(d, "bos_token_id", int, None, nullable=True),
        eos_token_ids=_eos_ids(d),
        yarn=yarn,
        quant=_parse_quant(d),
        **(_parse_indexer(d) if v32 else {}),
        raw=dict(d),
    )
    _validate(cfg)
    return cfg


def _validate(cfg: ModelConfig) -> None:
    if cfg.n_routed_experts:
        if not 1 <= cfg.num_experts_per_tok <= cfg.n_routed_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok ({cfg.num_experts_per_tok}) must be in 1..n_routed_experts "
                f"({cfg.n_routed_experts})"
            )
        if cfg.n_routed_experts % cfg.n_group:
            raise ConfigError(
                f"config.json: n_routed_experts ({cfg.n_routed_experts}) must be divisible by n_group ({cfg.n_group})"
            )
        if cfg.topk_group > cfg.n_group:
            raise ConfigError(f"config.json: topk_group ({cfg.topk_group}) must be <= n_group ({cfg.n_group})")
        per_group = cfg.n_routed_experts // cfg.n_group
        if cfg.topk_method != "greedy" and cfg.topk_group * per_group < cfg.num_experts_per_tok:
            raise ConfigError(
                f"config.json: topk_group ({cfg.topk_group}) groups of {per_group} experts cannot supply "
                f"num_experts_per_tok ({cfg.num_experts_per_tok}) experts"
            )
        if cfg.topk_method == "noaux_tc" and per_group < 2:
            raise ConfigError("config.json: noaux_tc ranks groups by their top-2 scores: n_group must leave >= 2 experts per group")
    if cfg.first_k_dense_replace > cfg.num_hidden_layers:
        raise ConfigError(
            f"config.json: first_k_dense_replace ({cfg.first_k_dense_replace}) exceeds num_hidden_layers "
            f"({cfg.num_hidden_layers})"
        )
    if cfg.has_indexer:
        if cfg.q_lora_rank is None:
            raise ConfigError("config.json: deepseek_v32 needs q_lora_rank (its indexer projects the query latent)")
        if cfg.index_head_dim < cfg.qk_rope_head_dim:
            raise ConfigError(
                f"config.json: index_head_dim ({cfg.index_head_dim}) must be >= qk_rope_head_dim "
                f"({cfg.qk_rope_head_dim}): the indexer rotates its first qk_rope_head_dim dims"
            )
    if cfg.qk_rope_head_dim % 2:
        raise ConfigError(f"config.json: qk_rope_head_dim must be even, got {cfg.qk_rope_head_dim}")
    for eos in cfg.eos_token_ids:
        if not 0 <= eos < cfg.vocab_size:
            raise ConfigError(f"config.json: eos_token_id {eos} is outside the vocabulary (size {cfg.vocab_size})")

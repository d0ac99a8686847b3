"""Reading HF-format DeepSeek checkpoints: sharded safetensors, FP8 block dequant, role-filtered loads.

A DeepSeek-V3 checkpoint is ~700 GB across ~160 shards, and no node needs all of it:
an attention node loads everything except the routed experts, an expert node only
the (layer, expert) pairs the placement gives it. So :meth:`Checkpoint.load` takes a
selection, opens only the shards that hold selected tensors, and reads only those
tensors from them (``safe_open`` + ``get_tensor`` reads one tensor's bytes).

dtype rule (``load(..., dtype=...)``): floating tensors are cast to ``dtype``, except
the router -- ``mlp.gate.weight`` and ``mlp.gate.e_score_correction_bias`` -- which
stays fp32, as transformers keeps it: expert selection compares close scores, and
bf16 router logits would pick different experts than the reference does.

FP8: V3/R1 store most linear weights as float8 e4m3 ``X.weight`` with an fp32
``X.weight_scale_inv`` holding one scale per ``block_size`` block (128x128; edge
blocks may be partial). They are dequantized on load (``w.float() * scale``), so the
rest of moemesh only ever sees ordinary floating weights -- unless the load asks
``keep_fp8=True`` (routed experts kept e4m3 on a GPU): then each such weight comes back
as an :class:`Fp8Tensor`, the stored e4m3 bytes with their fp32 scales. ``*_scale_inv``
tensors are never listed by :meth:`Checkpoint.names` nor returned on their own by ``load``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moemesh.model.config import ConfigError, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
DEFAULT_FP8_BLOCK = (128, 128)
FP8_MAX = 448.0  # largest finite float8 e4m3fn value
# A load bigger than either threshold shows a progress bar (when ``progress`` is true and stderr is a tty).
PROGRESS_MIN_BYTES = 64 << 20
PROGRESS_MIN_TENSORS = 200
# Files that travel with the weights when a checkpoint directory is rewritten.
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(?:gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")

# safetensors header dtype names -> bytes per element (for sizes/progress only).
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as asked; the message says what is missing or wrong."""


@dataclass(frozen=True)
class Fp8Tensor:
    """One block-quantized 2-D weight as stored: ``q * scale_inv`` (each scale over its block) is the weight."""

    q: torch.Tensor  # [rows, cols] float8_e4m3fn
    scale_inv: torch.Tensor  # [ceil(rows/block[0]), ceil(cols/block[1])] float32
    block: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """fp32, by the one dequantization used on load (:func:`dequantize_fp8_blockwise`)."""
        return dequantize_fp8_blockwise(self.q, self.scale_inv, self.block)


# ---- role filters ---------------------------------------------------------


def parse_expert(name: str) -> tuple[int, int] | None:
    """``(layer, expert)`` for a routed-expert weight name, else None (shared experts are not routed)."""
    m = _EXPERT_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_routed_expert(name: str) -> bool:
    """True for ``model.layers.{L}.mlp.experts.{E}.(gate|up|down)_proj.weight``: what expert nodes host."""
    return _EXPERT_RE.match(name) is not None


def attention_side(name: str) -> bool:
    """True for everything an attention node loads: all tensors except routed experts."""
    return not is_routed_expert(name)


def expert_tensor_names(layer: int, expert: int) -> list[str]:
    """The three weight names of one routed expert, in gate/up/down order."""
    return [f"model.layers.{layer}.mlp.experts.{expert}.{p}.weight" for p in _EXPERT_PROJS]


def keeps_fp32(name: str) -> bool:
    """Router tensors stay fp32 whatever load dtype is asked (see the module docstring)."""
    # V3.2's indexer head weights too (transformers keeps indexer.weights_proj in fp32).
    return (name.endswith("e_score_correction_bias") or name.endswith("mlp.gate.weight")
            or name.endswith("indexer.weights_proj.weight"))


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


# ---- FP8 block quantization -----------------------------------------------


def _scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def quantize_fp8_blockwise(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_FP8_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to float8 e4m3 with one fp32 scale per block, DeepSeek-V3 style.

    Returns ``(q, scale_inv)`` with ``q * scale_inv`` (broadcast per block) ~= ``w``;
    ``scale_inv`` has shape ``[ceil(rows/b0), ceil(cols/b1)]``. Used to make FP8 twins
    of small checkpoints so the FP8 path is tested without a 700 GB download.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8_blockwise needs a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    br, bc = block
    gr, gc = _scale_grid(w.shape, block)
    padded = torch.zeros(gr * br, gc * bc, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(gr, br, gc, bc)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = amax / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero block: any scale works
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(gr * br, gc * bc)[:rows, :cols].contiguous()
    return q, scale.contiguous()


def dequantize_fp8_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_FP8_BLOCK, *, name: str = "weight"
) -> torch.Tensor:
    """fp32 ``q * scale_inv`` with each scale broadcast over its block; edge blocks may be partial.

    The one dequantization used both on load and by :func:`write_dequantized`, so an FP8
    checkpoint and its dequantized twin load to bit-identical weights.
    """
    _check_scale_shape(q, scale_inv, block, name)
    rows, cols = q.shape
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return q.float() * scale


def _check_scale_shape(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str) -> None:
    if q.dim() != 2:
        raise CheckpointError(f"{name}: FP8 weights must be 2-D, got shape {tuple(q.shape)}")
    want = _scale_grid(q.shape, block)
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(
            f"{name}{SCALE_SUFFIX} has shape {list(scale_inv.shape)}, but a {list(q.shape)} weight in "
            f"{block[0]}x{block[1]} blocks needs {list(want)}: check quantization_config.weight_block_size"
        )


# ---- safetensors headers --------------------------------------------------


def _read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of one safetensors file (name -> dtype, shape, data_offsets), without reading data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    return header


def _nbytes(entry: dict[str, Any]) -> int:
    start, end = entry.get("data_offsets", (0, 0))
    return int(end) - int(start)


FINGERPRINT_SAMPLE = 4096  # bytes of tensor data read from each end of every weight file


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """A short id of a checkpoint's contents, cheap to compute on any size of model.

    sha256 over config.json and, per weight file (sorted by name): its name, its safetensors header
    (tensor names, dtypes, shapes, offsets) and the first and last 4 KiB of its tensor data. Two
    checkpoints of the same shape but other weights differ in the sampled data; reading them costs
    a few small reads per file. Nodes compare fingerprints so a mesh never mixes two checkpoints.
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    try:
        digest.update((root / "config.json").read_bytes())
        for path in sorted(root.glob("*.safetensors")):
            with open(path, "rb") as f:
                raw = f.read(8)
                (n,) = struct.unpack("<Q", raw)
                header = f.read(n)
                size = path.stat().st_size
                digest.update(path.name.encode() + raw + header)
                digest.update(f.read(FINGERPRINT_SAMPLE))
                f.seek(max(8 + n, size - FINGERPRINT_SAMPLE))
                digest.update(f.read(FINGERPRINT_SAMPLE))
    except (OSError, struct.error) as exc:
        raise CheckpointError(f"cannot fingerprint the checkpoint in {root}: {exc}") from None
    return digest.hexdigest()[:16]


# ---- the reader -------------------------------------------------------------


class Checkpoint:
    """A checkpoint directory: which tensor lives in which file, and selective loading.

    Layouts: one ``model.safetensors``; shards listed by ``model.safetensors.index.json``;
    or several ``*.safetensors`` without an index (their headers are scanned).
    """

    def __init__(self, model_dir: str | Path, config: ModelConfig) -> None:
        self.model_dir = Path(model_dir)
        self.config = config
        if not self.model_dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.model_dir} does not exist")
        self._headers: dict[str, dict[str, dict[str, Any]]] = {}
        self._where: dict[str, str] = self._locate()  # stored tensor name -> file name

    def _locate(self) -> dict[str, str]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} has no usable 'weight_map': {exc!r}") from None
            missing = sorted({f for f in weight_map.values() if not (self.model_dir / f).is_file()})
            if missing:
                raise CheckpointError(
                    f"{self.model_dir}: {len(missing)} shard(s) listed in {INDEX_FILE} are missing: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                )
            return dict(weight_map)
        files = [SINGLE_FILE] if (self.model_dir / SINGLE_FILE).is_file() else sorted(
            p.name for p in self.model_dir.glob("*.safetensors")
        )
        if not files:
            raise CheckpointError(
                f"{self.model_dir} holds no weights: expected {SINGLE_FILE}, sharded *.safetensors "
                f"with {INDEX_FILE}, or several *.safetensors"
            )
        where: dict[str, str] = {}
        for file in files:
            for name in self._header(file):
                if name in where:
                    raise CheckpointError(f"tensor {name} is stored in both {where[name]} and {file}")
                where[name] = file
        return where

    def _header(self, file: str) -> dict[str, dict[str, Any]]:
        if file not in self._headers:
            self._headers[file] = _read_header(self.model_dir / file)
        return self._headers[file]

    @property
    def fp8_block(self) -> tuple[int, int]:
        """Block size of ``weight_scale_inv`` scales: from quantization_config, else DeepSeek's 128x128."""
        return self.config.quant.block_size if self.config.quant is not None else DEFAULT_FP8_BLOCK

    def names(self) -> list[str]:
        """Logical tensor names, sorted: no ``*_scale_inv``, no layers past ``num_hidden_layers`` (V3's MTP layer)."""
        out = []
        for name in self._where:
            layer = _layer_of(name)
            if name.endswith(SCALE_SUFFIX) or (layer is not None and layer >= self.config.num_hidden_layers):
                continue
            out.append(name)
        return sorted(out)

    def files_for(self, names: Iterable[str]) -> list[str]:
        """The files a load of ``names`` opens (FP8 scales included): what a node must have locally."""
        return sorted({self._where[k] for k in self._stored_keys(self._resolve(names))})

    def _stored_keys(self, names: list[str]) -> list[str]:
        keys = []
        for name in names:
            keys.append(name)
            if name + SCALE_SUFFIX in self._where:
                keys.append(name + SCALE_SUFFIX)
        return keys

    def _resolve(self, select: Callable[[str], bool] | Iterable[str]) -> list[str]:
        if callable(select):
            return [n for n in self.names() if select(n)]
        wanted = list(dict.fromkeys(select))  # dedupe, keep order
        scales = [n for n in wanted if n.endswith(SCALE_SUFFIX)]
        if scales:
            raise CheckpointError(
                f"requested {scales[0]}: scales are applied on load; request the weight itself"
            )
        missing = [n for n in wanted if n not in self._where]
        if missing:
            raise CheckpointError(
                f"{len(missing)} requested tensor(s) are not in {self.model_dir}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        return wanted

    def load(
        self,
        select: Callable[[str], bool] | Iterable[str],
        *,
        dtype: torch.dtype,
        progress: bool = True,
        desc: str = "loading weights",
        keep_fp8: bool = False,
    ) -> dict[str, torch.Tensor | Fp8Tensor]:
        """Read the selected tensors, FP8 dequantized and cast per the module's dtype rule.

        ``select`` is a predicate over :meth:`names` (e.g. :func:`attention_side`) or an
        explicit list of names (e.g. from :func:`expert_tensor_names`); explicit names
        that the checkpoint lacks raise :class:`CheckpointError`. Shards holding none of
        the selected tensors are never opened. The result follows the selection order.
        ``keep_fp8``: FP8 weights come back as :class:`Fp8Tensor` (stored bytes, no
        dequantization, no cast); other tensors follow the dtype rule as usual.
        """
        names = self._resolve(select)
        by_file: dict[str, list[str]] = {}
        for key in self._stored_keys(names):
            by_file.setdefault(self._where[key], []).append(key)
        total = sum(_nbytes(self._header(f).get(k, {})) for f, keys in by_file.items() for k in keys)
        large = total > PROGRESS_MIN_BYTES or len(names) > PROGRESS_MIN_TENSORS
        bar = _progress_bar(total, desc, enabled=progress and large)

        out: dict[str, torch.Tensor] = {}
        scales: dict[str, torch.Tensor] = {}
        pending: dict[str, torch.Tensor] = {}  # FP8 weights whose scale sits in a later shard
        try:
            for file, keys in by_file.items():
                with safe_open(str(self.model_dir / file), framework="pt") as f:
                    present = set(f.keys())
                    # Scales first, so a weight beside its scale is dequantized at once.
                    for key in sorted(keys, key=lambda k: not k.endswith(SCALE_SUFFIX)):
                        if key not in present:
                            raise CheckpointError(f"{INDEX_FILE} places {key} in {file}, but that file lacks it")
                        raw = f.get_tensor(key)
                        bar.update(_nbytes(self._header(file)[key]))
                        if key.endswith(SCALE_SUFFIX):
                            weight = key[: -len(SCALE_SUFFIX)]
                            scales[weight] = raw
                            if weight in pending:
                                out[weight] = self._finish(weight, pending.pop(weight), raw, dtype, keep_fp8)
                        elif key + SCALE_SUFFIX in self._where and key not in scales:
                            pending[key] = raw
                        else:
                            out[key] = self._finish(key, raw, scales.get(key), dtype, keep_fp8)
        finally:
            bar.close()
        if pending:  # only reachable if a scale listed in the index was never read
            raise CheckpointError(f"no {SCALE_SUFFIX} was read for {', '.join(list(pending)[:5])}")
        return {n: out[n] for n in names}

    def _finish(self, name: str, raw: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype,
                keep_fp8: bool = False) -> torch.Tensor | Fp8Tensor:
        target = torch.float32 if keeps_fp32(name) else dtype
        if scale is not None:
            if raw.dtype != torch.float8_e4m3fn:
                raise CheckpointError(
                    f"{name} has a {SCALE_SUFFIX} sibling but is stored as {raw.dtype}, not float8_e4m3fn"
                )
            if keep_fp8:
                _check_scale_shape(raw, scale, self.fp8_block, name)
                return Fp8Tensor(raw, scale.float(), self.fp8_block)
            return dequantize_fp8_blockwise(raw, scale, self.fp8_block, name=name).to(target)
        if raw.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise CheckpointError(f"{name} is stored as {raw.dtype} but has no {name}{SCALE_SUFFIX} to dequantize it")
        return raw.to(target) if raw.is_floating_point() else raw


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, *, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    # disable=None: tqdm stays silent when stderr is not a tty (logs, CI).
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None)


# ---- rewriting checkpoints (FP8 twins for tests and tooling) --------------------


def _iter_stored(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stored tensor (scales and MTP layers included) in its stored dtype."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} holds no *.safetensors files")
    for file in files:
        with safe_open(str(model_dir / file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _should_quantize(name: str, t: torch.Tensor) -> bool:
    if t.dim() != 2 or not name.endswith(".weight") or not t.is_floating_point():
        return False
    skip = ("embed_tokens" in name, "norm" in name, name.startswith("lm_head"), name.endswith("mlp.gate.weight"))
    return not any(skip)


def _save_checkpoint(tensors: dict[str, torch.Tensor], dst: Path, shard_max_bytes: int | None) -> None:
    """Write one model.safetensors, or shards of at most ``shard_max_bytes`` plus an index.

    A weight and its scale always share a shard, as DeepSeek's own shards do.
    """
    meta = {"format": "pt"}
    if shard_max_bytes is None:
        save_file(tensors, str(dst / SINGLE_FILE), metadata=meta)
        return
    groups: list[list[str]] = []
    for name in tensors:
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in tensors:
            continue
        groups.append([name] + ([name + SCALE_SUFFIX] if name + SCALE_SUFFIX in tensors else []))
    shards: list[list[str]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(tensors[n].numel() * tensors[n].element_size() for n in group)
        if shards[-1] and size + nbytes > shard_max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(dst / file), metadata=meta)
        weight_map.update({n: file for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _prepare_dst(src: Path, dst: Path) -> dict[str, Any]:
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json")
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"destination {dst} is the source directory; choose another")
    dst.mkdir(parents=True, exist_ok=True)
    for name in _SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return json.loads((src / "config.json").read_text())


def write_fp8_twin(
    src_dir: str | Path,
    dst_dir: str | Path,
    block: tuple[int, int] = DEFAULT_FP8_BLOCK,
    shard_max_bytes: int | None = None,
) -> Path:
    """Copy a checkpoint with its linear weights quantized to FP8 e4m3 blocks, as DeepSeek-V3 ships.

    Quantized: every 2-D ``*.weight`` except embeddings, norms, ``lm_head`` and the router
    (``mlp.gate.weight``), each with a ``*.weight_scale_inv`` sibling; config.json gains
    V3's ``quantization_config``. ``shard_max_bytes`` writes shards plus an index.
    Holds the whole checkpoint in memory: meant for small test and demo models.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    config = _prepare_dst(src, dst)
    if config.get("quantization_config"):
        raise CheckpointError(f"{src} is already quantized ({config['quantization_config']})")
    out: dict[str, torch.Tensor] = {}
    for name, t in _iter_stored(src):
        if _should_quantize(name, t):
            out[name], out[name + SCALE_SUFFIX] = quantize_fp8_blockwise(t, block)
        else:
            out[name] = t
    _save_checkpoint(out, dst, shard_max_bytes)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [int(block[0]), int(block[1])],
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def write_dequantized(
    src_fp8_dir: str | Path,
    dst_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    shard_max_bytes: int | None = None,
) -> Path:
    """Copy an FP8 checkpoint with every ``weight_scale_inv`` pair dequantized to ``dtype``.

    The result has no quantization_config, so transformers (the oracle) loads it as a
    plain model. With the default fp32 it holds exactly what :meth:`Checkpoint.load`
    computes from the FP8 files, so both load to bit-identical weights at any dtype.
    Other tensors are copied unchanged. Holds the whole checkpoint in memory.
    """
    src, dst = Path(src_fp8_dir), Path(dst_dir)
    config = _prepare_dst(src, dst)
    try:
        quant = ModelConfig.from_dict(config).quant
    except ConfigError as exc:
        raise CheckpointError(f"{src}/config.json: {exc}") from None
    block = quant.block_size if quant is not None else DEFAULT_FP8_BLOCK
    stored = dict(_iter_stored(src))
    out: dict[str, torch.Tensor] = {}
    for name, t in stored.items():
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in stored:
            continue
        scale = stored.get(name + SCALE_SUFFIX)
        out[name] = t if scale is None else dequantize_fp8_blockwise(t, scale, block, name=name).to(dtype)
    _save_checkpoint(out, dst, shard_max_bytes)
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst

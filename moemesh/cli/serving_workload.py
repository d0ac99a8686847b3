"""The workload of ``moemesh bench --serving``: who arrives when, with how long a prompt, asking for how many tokens.

Pure and seeded: the same flags give the same requests on every machine, so moemesh and the transformers
baseline (and two runs of either) see exactly the same prompts, output lengths and arrival times.

Arrivals follow vLLM's benchmark_serving: the first request at t = 0, then gaps drawn from a gamma
distribution of shape ``burstiness`` and scale ``1 / (rate * burstiness)`` (mean ``1 / rate``); burstiness 1
is the exponential, i.e. a Poisson process at ``rate`` requests/s. Lower burstiness is burstier, higher is
more even. ``rate = inf`` sends everything at t = 0.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moemesh.errors import MoemeshError


class WorkloadError(MoemeshError):
    """A length distribution or lengths file is wrong; the message names the flag, line or field."""


# Independent streams of one seed: changing how prompts are drawn never moves the arrival times.
_ARRIVALS, _LENGTHS, _PROMPTS = 0, 1, 2


@dataclass(frozen=True)
class LengthDist:
    """``fixed:N`` (always N) or ``uniform:LO:HI`` (integers LO..HI, both included)."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, text: str, flag: str) -> LengthDist:
        kind, _, rest = text.partition(":")
        parts = rest.split(":") if rest else []
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = None
        if kind == "fixed" and values is not None and len(values) == 1:
            lo = hi = values[0]
        elif kind == "uniform" and values is not None and len(values) == 2:
            lo, hi = values
        else:
            raise WorkloadError(f"{flag}: expected fixed:N or uniform:LO:HI (integers), got {text!r}")
        if lo < 1 or hi < lo:
            raise WorkloadError(f"{flag}: lengths must satisfy 1 <= LO <= HI, got {text!r}")
        return cls(lo, hi)

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        return [int(x) for x in rng.integers(self.lo, self.hi, size=n, endpoint=True)]

    def __str__(self) -> str:
        return f"fixed:{self.lo}" if self.lo == self.hi else f"uniform:{self.lo}:{self.hi}"


def read_lengths_jsonl(path: str | Path) -> list[tuple[int, int]]:
    """``(prompt_len, output_len)`` per line of a JSONL file of ``{"prompt_len": P, "output_len": O}`` objects.

    Blank lines are skipped; anything else wrong is an error naming the file, the line and the field."""
    pairs = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise WorkloadError(f"--lengths-file {path}: cannot read it ({exc.strerror or exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--lengths-file {path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise WorkloadError(f'{where}: expected an object like {{"prompt_len": 32, "output_len": 64}}')
        pair = []
        for key in ("prompt_len", "output_len"):
            value = obj.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                got = "missing" if key not in obj else f"got {value!r}"
                raise WorkloadError(f"{where}: {key!r} must be an integer >= 1 ({got})")
            pair.append(value)
        pairs.append((pair[0], pair[1]))
    if not pairs:
        raise WorkloadError(f"--lengths-file {path}: no lines with lengths")
    return pairs


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start at which each of ``n`` requests is sent (see the module docstring)."""
    if not rate > 0:
        raise WorkloadError(f"--rate must be > 0 requests/s or inf, got {rate!r}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise WorkloadError(f"--burstiness must be > 0, got {burstiness!r}")
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng([seed, _ARRIVALS])
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *(float(t) for t in np.cumsum(gaps))]


@dataclass(frozen=True)
class ServingRequest:
    index: int
    arrival_s: float  # seconds after the benchmark's start at which it is sent
    prompt_ids: tuple[int, ...]
    output_len: int  # tokens asked for (max_tokens, EOS ignored): what every side generates

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def draw_lengths(n: int, input_len: LengthDist, output_len: LengthDist, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng([seed, _LENGTHS])
    return list(zip(input_len.draw(rng, n), output_len.draw(rng, n)))


def build_workload(lengths: list[tuple[int, int]], arrivals: list[float], vocab_size: int,
                   seed: int, low_id: int = 2) -> list[ServingRequest]:
    """Requests with random prompt token ids in ``[low_id, vocab_size)`` (the tiny checkpoints' ids 0 and 1
    are BOS and EOS), ``lengths[i]`` = (prompt_len, output_len), sent at ``arrivals[i]``."""
    if len(lengths) != len(arrivals):
        raise ValueError(f"{len(lengths)} lengths for {len(arrivals)} arrivals")
    if vocab_size <= low_id:
        raise WorkloadError(f"vocabulary of {vocab_size} ids leaves none >= {low_id} for random prompts")
    rng = np.random.default_rng([seed, _PROMPTS])
    out = []
    for i, ((prompt_len, output_len), at) in enumerate(zip(lengths, arrivals)):
        ids = tuple(int(t) for t in rng.integers(low_id, vocab_size, size=prompt_len))
        out.append(ServingRequest(i, at, ids, output_len))
    return out


def static_batches(requests: list[ServingRequest], batch_size: int) -> list[list[ServingRequest]]:
    """The baseline's batches: consecutive runs of ``batch_size`` requests in arrival order (the last may be
    smaller)."""
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.index))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]

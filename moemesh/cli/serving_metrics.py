"""Per-request timings of ``moemesh bench --serving`` and their summary, defined as vLLM's benchmark_serving.

For one request (all times client-side, in seconds on one clock):
- TTFT, time to first token: first chunk carrying a token - send.
- E2EL, end-to-end latency: the stream's end (last chunk) - send.
- TPOT, time per output token excluding the first: (E2EL - TTFT) / (output tokens - 1); only for requests
  with more than one output token.
- ITL, inter-token latency: every gap between consecutive chunks carrying tokens (a chunk with several
  tokens is one gap, as vLLM counts it).
Over the run: request throughput = completed requests / duration, output throughput = output tokens /
duration, total token throughput = (input + output tokens) / duration, duration = first send to last end.
Each of TTFT, TPOT, ITL, E2EL gets mean, median, std and the chosen percentiles, by ``numpy.percentile``
(linear interpolation), in milliseconds; an empty list counts as ``[0]``, as in vLLM. Goodput (vLLM's
``--goodput``) is completed requests per second meeting every given SLO (TTFT, TPOT, E2EL in ms; a one-token
request's TPOT counts as 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moemesh.cli.serving_workload import WorkloadError

METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}
WIDTH, LABEL, COLUMN = 50, 40, 14


@dataclass
class RequestRecord:
    """What the client saw of one request; times are seconds from the benchmark's start."""

    index: int
    prompt_len: int
    expected_output_len: int
    send_s: float  # when it was sent (the baseline: when it arrived)
    chunk_s: list[float] = field(default_factory=list)  # each chunk that carried at least one token
    output_tokens: int = 0
    end_s: float | None = None  # when the stream ended; None while running or after an error
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None and bool(self.chunk_s)

    @property
    def ttft(self) -> float:
        return self.chunk_s[0] - self.send_s

    @property
    def e2el(self) -> float:
        return self.end_s - self.send_s  # type: ignore[operator]

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]

    def to_json(self) -> dict:
        out = {"index": self.index, "prompt_len": self.prompt_len, "expected_output_len": self.expected_output_len,
               "output_tokens": self.output_tokens, "send_s": self.send_s, "error": self.error}
        if self.ok:
            out.update(ttft_ms=self.ttft * 1e3, e2el_ms=self.e2el * 1e3,
                       tpot_ms=None if self.tpot is None else self.tpot * 1e3, itl_ms=[g * 1e3 for g in self.itls])
        return out


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in GOODPUT_METRICS:
            raise WorkloadError(f"--goodput {item!r}: the metric must be one of {', '.join(GOODPUT_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if not ms >= 0:
            raise WorkloadError(f"--goodput {item!r}: expected METRIC:MILLISECONDS, e.g. ttft:500")
        slos[name] = ms
    return slos


def percentile_key(p: float) -> str:
    return f"p{int(p) if float(p).is_integer() else p}"


def _stats(values: list[float], name: str, percentiles: list[float]) -> dict[str, float]:
    ms = np.asarray(values or [0.0], dtype=np.float64) * 1e3
    out = {f"mean_{name}_ms": float(np.mean(ms)), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(np.std(ms))}
    for p in percentiles:
        out[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def summarize(records: list[RequestRecord], duration_s: float, percentiles: list[float],
              goodput: dict[str, float] | None = None) -> dict:
    """Every figure of one side (see the module docstring), as a flat dict of JSON numbers."""
    done = [r for r in records if r.ok]
    values = {
        "ttft": [r.ttft for r in done],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [g for r in done for g in r.itls],
        "e2el": [r.e2el for r in done],
    }
    total_in = sum(r.prompt_len for r in done)
    total_out = sum(r.output_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    out = {
        "completed": len(done), "failed": len(records) - len(done), "duration_s": duration_s,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
    }
    if goodput:
        out["request_goodput"] = per_s(sum(_meets(r, goodput) for r in done))
    for name in METRICS:
        out.update(_stats(values[name], name, percentiles))
    return out


def _meets(r: RequestRecord, slos: dict[str, float]) -> bool:
    got = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2el}
    return all(got[name] * 1e3 <= ms for name, ms in slos.items())


def _row(label: str, cells: list[str]) -> str:
    return f"{label:<{LABEL}}" + "".join(f"{c:>{COLUMN}}" for c in cells)


def format_table(sides: dict[str, dict], percentiles: list[float], header: list[str] | None = None) -> str:
    """vLLM's "Serving Benchmark Result" table, one column per side (e.g. moemesh, transformers)."""
    summaries = list(sides.values())
    width = max(WIDTH, LABEL + COLUMN * len(sides))
    lines = [" Serving Benchmark Result ".center(width, "="), *(header or [])]
    if len(sides) > 1:
        lines.append(_row("", list(sides)))

    def count(label, key):
        lines.append(_row(label, [str(s[key]) for s in summaries]))

    def num(label, key):
        lines.append(_row(label, ["-" if key not in s else f"{s[key]:.2f}" for s in summaries]))

    count("Successful requests:", "completed")
    if any(s["failed"] for s in summaries):
        count("Failed requests:", "failed")
    num("Benchmark duration (s):", "duration_s")
    count("Total input tokens:", "total_input_tokens")
    count("Total generated tokens:", "total_output_tokens")
    num("Request throughput (req/s):", "request_throughput")
    if any("request_goodput" in s for s in summaries):
        num("Request goodput (req/s):", "request_goodput")
    num("Output token throughput (tok/s):", "output_throughput")
    num("Total Token throughput (tok/s):", "total_token_throughput")
    for name in METRICS:
        title, short = TITLES[name]
        lines.append(title.center(width, "-"))
        num(f"Mean {short} (ms):", f"mean_{name}_ms")
        num(f"Median {short} (ms):", f"median_{name}_ms")
        for p in percentiles:
            key = percentile_key(p)
            num(f"{key.upper()} {short} (ms):", f"{key}_{name}_ms")
    lines.append("=" * width)
    return "\n".join(lines)

"""The transformers baseline of ``moemesh bench --serving``: the same requests through ``generate`` in
arrival-ordered static batches.

What is measured, exactly:
- Batches are consecutive runs of ``--baseline-batch`` requests in arrival order. A batch starts when its
  last request has arrived and the previous batch has finished; there is one model, so batches never
  overlap. Its prompts are left-padded to the longest and it generates greedily, EOS ignored, as many
  tokens as its longest requested output.
- The clock is the arrival schedule's: a request "arrives" at its drawn arrival time, and the baseline does
  not sleep through idle gaps (nothing runs in them, so sleeping would change no figure); a batch's start
  is ``max(last arrival, previous batch's end)`` and its steps take the time they are measured to take.
- A streamer records the wall time at the end of every generation step (after the step's tokens reached
  the host). Request i's token k counts as delivered at the end of step k of its batch, as if the batch
  streamed each step's tokens: TTFT = end of the batch's first step (prefill + first token) - arrival,
  E2EL = end of step ``output_len`` - arrival, ITL = the gaps between its steps. Tokens past a request's
  ``output_len`` (the batch runs to its longest) are dropped and not counted.
"""

from __future__ import annotations

import time

import torch

from moemesh.cli.serving_metrics import RequestRecord
from moemesh.cli.serving_workload import ServingRequest, static_batches

PAD_ID = 0


class StepClock:
    """A transformers streamer that keeps the time each ``put`` arrives: the prompt first, then every step's
    tokens (the ``.tolist()`` waits for the device, so a time is when the tokens are on the host)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        value.tolist()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _padded(batch: list[ServingRequest], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.prompt_len for r in batch)
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):  # left padding: every prompt ends where generation starts
        ids[row, width - r.prompt_len:] = torch.tensor(r.prompt_ids)
        mask[row, width - r.prompt_len:] = 1
    return ids.to(device), mask.to(device)


def _generate(hf, batch: list[ServingRequest], new_tokens: int,
              device: torch.device) -> tuple[list[float], int, float]:
    """Seconds from the call to the end of each generation step, the tokens each row got, and the seconds
    the whole call took."""
    ids, mask = _padded(batch, device)
    clock = StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=PAD_ID, streamer=clock)
    took = time.perf_counter() - start
    steps = [t - start for t in clock.times[1:]]  # times[0]: generate's put of the prompt, before prefill
    return steps, min(out.shape[1] - ids.shape[1], len(steps)), took


def run_baseline(hf, requests: list[ServingRequest], batch_size: int,
                 device: torch.device) -> tuple[list[RequestRecord], float]:
    """Records in request order and the duration (first arrival to the last batch's end, on the schedule's
    clock); see the module docstring for what each time is."""
    batches = static_batches(requests, batch_size)
    _generate(hf, batches[0], 2, device)  # warm-up: first calls allocate and pick kernels
    records: dict[int, RequestRecord] = {}
    clock = 0.0
    for batch in batches:
        start = max(clock, max(r.arrival_s for r in batch))
        steps, produced, took = _generate(hf, batch, max(r.output_len for r in batch), device)
        for r in batch:
            n = min(r.output_len, produced)
            chunks = [start + s for s in steps[:n]]
            records[r.index] = RequestRecord(r.index, r.prompt_len, r.output_len, send_s=r.arrival_s,
                                             chunk_s=chunks, output_tokens=n, end_s=chunks[-1] if chunks else None,
                                             error=None if chunks else "transformers generated no tokens")
        clock = start + took
    return [records[r.index] for r in requests], clock

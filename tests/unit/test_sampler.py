"""Sampler: greedy, temperature, top-k, top-p and per-request seeded generators."""

from __future__ import annotations

import torch

from moemesh.attn_node.sampler import sample, skip_draws
from moemesh.sampling import SamplingParams


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def rand_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=gen(seed)) * 3


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int) -> list[int]:
    """n independent draws for one row, sharing one generator as a request does across steps."""
    g = gen(seed)
    return sample(logits_row.expand(n, -1).clone(), [params] * n, [g] * n)


def test_greedy_is_argmax():
    logits = rand_logits(6, 50)
    out = sample(logits, [SamplingParams(temperature=0.0)] * 6, [None] * 6)
    assert out == logits.argmax(-1).tolist()
    assert all(isinstance(t, int) for t in out)


def test_greedy_ignores_top_k_top_p_and_generator():
    logits = rand_logits(3, 50, seed=1)
    params = [SamplingParams(temperature=0.0, top_k=5, top_p=0.3, seed=3)] * 3
    assert sample(logits, params, [gen(0)] * 3) == logits.argmax(-1).tolist()


def test_does_not_modify_logits():
    logits = rand_logits(2, 20)
    before = logits.clone()
    sample(logits, [SamplingParams(temperature=0.7, top_k=3, top_p=0.5)] * 2, [gen(0), gen(1)])
    assert torch.equal(logits, before)


def test_mixed_batch_greedy_rows_stay_greedy():
    logits = rand_logits(4, 50, seed=2)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1)] * 2
    out = sample(logits, params, [None, gen(0), None, gen(1)])
    assert out == logits.argmax(-1).tolist()


def test_top_k_1_is_greedy_even_at_high_temperature():
    logits = rand_logits(8, 100, seed=3)
    for seed in range(5):
        params = [SamplingParams(temperature=100.0, top_k=1)] * 8
        assert sample(logits, params, [gen(seed)] * 8) == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_top_token():
    logits = rand_logits(8, 100, seed=4)
    for seed in range(5):
        params = [SamplingParams(temperature=5.0, top_p=1e-6)] * 8
        assert sample(logits, params, [gen(seed)] * 8) == logits.argmax(-1).tolist()


def test_top_k_only_draws_from_the_k_best():
    logits = rand_logits(1, 40, seed=5)[0]
    top3 = set(torch.topk(logits, 3).indices.tolist())
    got = draws(logits, SamplingParams(temperature=10.0, top_k=3), 600, seed=0)
    assert set(got) == top3  # at temperature 10 all three show up, nothing else does


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # probs 0.4, 0.3, 0.2, 0.1: top_p 0.5 keeps {0, 1} (0.4 < 0.5, 0.7 >= 0.5) renormalised to 4/7, 3/7.
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    n = 6000
    got = torch.tensor(draws(logits, SamplingParams(temperature=1.0, top_p=0.5), n, seed=1))
    assert set(got.tolist()) == {0, 1}
    assert abs((got == 0).float().mean().item() - 4 / 7) < 0.03


def test_top_p_exactly_reached_by_the_top_token_keeps_only_it():
    logits = torch.tensor([1.0, 0.8, 0.7, -0.2])
    top_mass = torch.softmax(logits, dim=-1).max().item()
    got = draws(logits, SamplingParams(temperature=1.0, top_p=top_mass), 300, seed=2)
    assert set(got) == {0}


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.zeros(1, 1000)[0]  # uniform over 1000: collisions of 30 draws are essentially impossible
    p = SamplingParams(temperature=1.0)
    a, b, c = draws(logits, p, 30, seed=7), draws(logits, p, 30, seed=7), draws(logits, p, 30, seed=8)
    assert a == b
    assert a != c


def test_per_row_generators_are_independent():
    logits = torch.zeros(2, 1000)
    p = [SamplingParams(temperature=1.0)] * 2
    alone = sample(logits[:1].clone(), p[:1], [gen(11)])
    together = sample(logits.clone(), p, [gen(99), gen(11)])
    assert together[1] == alone[0]


def _check_frequencies(logits: torch.Tensor, temperature: float, seed: int) -> None:
    n = 8000
    got = torch.tensor(draws(logits, SamplingParams(temperature=temperature), n, seed=seed))
    freq = torch.bincount(got, minlength=logits.numel()).float() / n
    expected = torch.softmax(logits / temperature, dim=-1)
    # Binomial std <= sqrt(0.25 / 8000) ~ 0.0056; 0.025 is > 4 sigma.
    assert (freq - expected).abs().max().item() < 0.025, (freq, expected)


def test_distribution_matches_softmax():
    _check_frequencies(torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]), temperature=1.0, seed=0)


def test_temperature_flattens_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    _check_frequencies(logits, temperature=2.0, seed=1)
    _check_frequencies(logits, temperature=0.5, seed=2)


def test_skip_draws_continues_the_seeded_stream_as_if_the_draws_had_happened():
    # The draws a failed node made came from other distributions (each step its own logits, any filter):
    # skipping as many on a fresh generator must leave it where the real draws left theirs.
    vocab, n = 64, 6
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.4),
              SamplingParams(temperature=1.0)]
    for p in params:
        logits = rand_logits(n + 4, vocab, seed=5)
        g = gen(11)
        full = [sample(logits[i : i + 1], [p], [g])[0] for i in range(n + 4)]
        resumed = gen(11)
        skip_draws(resumed, vocab, n)
        assert [sample(logits[i : i + 1], [p], [resumed])[0] for i in range(n, n + 4)] == full[n:]
        assert torch.equal(resumed.get_state(), g.get_state())


def test_skip_no_draws_leaves_the_generator_alone():
    g = gen(3)
    skip_draws(g, 50, 0)
    assert torch.equal(g.get_state(), gen(3).get_state())

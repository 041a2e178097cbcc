"""Sampling, incremental detokenization and stop strings: each against a plain, whole-sequence reference."""

from __future__ import annotations

import numpy as np
import pytest

from dijiang_deploy.contract.errors import DiJiangError
from dijiang_deploy.runtime.sampling import SamplingParams, SplitMix64, TokenSampler
from dijiang_deploy.runtime.text import StopMatcher


def test_splitmix64_reference_values():
    """The published SplitMix64 outputs for seed 0 (also what the C runtime checks)."""
    rng = SplitMix64(0)
    assert [rng.next_u64() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    rng = SplitMix64(7)
    u = [rng.uniform() for _ in range(1000)]
    assert min(u) >= 0.0 and max(u) < 1.0 and abs(np.mean(u) - 0.5) < 0.05
    back = SplitMix64.from_record(rng.to_record())
    assert back.next_u64() == rng.next_u64()


def _reference_probs(logits, params: SamplingParams, seen_prompt=(), generated=()):
    """Hugging Face's order, written out over the full sorted vocabulary."""
    x = logits.astype(np.float64).copy()
    counts = np.bincount(np.asarray(list(seen_prompt) + list(generated), np.int64), minlength=x.size)
    gen = np.bincount(np.asarray(list(generated), np.int64), minlength=x.size)
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        x[seen] = np.where(x[seen] > 0, x[seen] / params.repetition_penalty, x[seen] * params.repetition_penalty)
    x -= params.frequency_penalty * gen + params.presence_penalty * (gen > 0)
    x /= params.temperature
    order = np.argsort(-x, kind="stable")
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    keep = np.zeros(x.size, bool)
    k = params.top_k if params.top_k else x.size
    keep[order[:k]] = True
    p = np.where(keep, probs, 0.0)
    p /= p.sum()
    if params.top_p < 1.0:
        cum = np.cumsum(p[order])
        n = int(np.searchsorted(cum, params.top_p)) + 1
        mask = np.zeros(x.size, bool)
        mask[order[:n]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    if params.min_p:
        p = np.where(p >= params.min_p * p.max(), p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=50, top_p=0.95),
    SamplingParams(temperature=1.0, top_p=0.999),  # needs far more than the first 64 candidates
    SamplingParams(temperature=0.8, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
])
def test_sampler_matches_the_full_sort_reference(params):
    """Partial selection and running counts give the reference distribution: the empirical
    frequencies of 4000 draws fall within a few standard errors, and no token outside
    the reference support is ever drawn."""
    rng = np.random.default_rng(0)
    vocab = 3000
    logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
    prompt = rng.integers(0, vocab, 30).tolist()
    generated = rng.integers(0, vocab, 10).tolist()
    want = _reference_probs(logits, params, prompt, generated)
    counts = np.zeros(vocab)
    sampler = TokenSampler(SamplingParams(**{**params.__dict__, "seed": 3}), vocab, prompt)
    for t in generated:
        sampler.observe(t)
    n = 4000
    for _ in range(n):
        counts[sampler(logits)] += 1
    assert counts[want == 0].sum() == 0, "drew a token the reference excludes"
    freq = counts / n
    se = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(freq - want) <= 5 * se + 2e-3)


def test_greedy_and_penalties_over_running_counts():
    logits = np.array([0.0, 5.0, 4.9, -1.0], np.float32)
    assert TokenSampler(SamplingParams(), 4)(logits) == 1
    s = TokenSampler(SamplingParams(repetition_penalty=1.5), 4, prompt=[1])
    assert s(logits) == 2, "the seen token's logit is divided by the penalty"
    f = TokenSampler(SamplingParams(frequency_penalty=0.06), 4)
    assert f(logits) == 1
    f.observe(1)
    f.observe(1)
    assert f(logits) == 2, "two occurrences cost 0.12 > the 0.1 lead"
    with pytest.raises(DiJiangError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(DiJiangError, match="an integer"):
        SamplingParams(top_k=2.5)


def test_same_seed_same_draws_other_seed_other_draws():
    logits = np.zeros(500, np.float32)
    a = TokenSampler(SamplingParams(temperature=1.0, seed=9), 500)
    b = TokenSampler(SamplingParams(temperature=1.0, seed=9), 500)
    c = TokenSampler(SamplingParams(temperature=1.0, seed=10), 500)
    da, db, dc = ([s(logits) for _ in range(20)] for s in (a, b, c))
    assert da == db and da != dc


def test_stop_strings_across_pieces_cut_text_and_tokens():
    pieces = ["Hel", "lo ", "wor", "ld", "!\nUs", "er: more"]
    m = StopMatcher(["\nUser:"])
    out = "".join(m.push(p) for p in pieces)
    assert m.stopped and out == "Hello world!"
    assert m.tokens_kept() == 4, "the piece holding the stop string's start is dropped"
    m = StopMatcher(["xyz"])
    emitted = [m.push(p) for p in ["ab", "cx", "y", "q"]]
    assert emitted == ["ab", "c", "", "xyq"], "a possible stop prefix is held back, then released"
    assert not m.stopped and m.flush() == "" and m.tokens_kept() == 4
    m = StopMatcher(["END"])
    assert m.push("abE") == "ab" and m.flush() == "E", "held-back text is flushed at the end"


@pytest.mark.parametrize("text", [
    "Hello, world! Héllo wörld naïve café 🎉🎊 中文字符 日本語",
    "def f(x):\n\treturn x  *  2   # spaces    and\ttabs\n\n\n",
    "emoji 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and combining e\u0301",
])
def test_stream_decoder_equals_whole_decode(smollm2_dir, text):
    from dijiang_deploy.runtime.tokenizer import TextTokenizer
    from dijiang_deploy.runtime.text import StreamDecoder

    tok = TextTokenizer(smollm2_dir)
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    # A stream cut inside a multi-byte character flushes what a whole decode gives.
    emoji = tok.encode(" 🎉")
    dec = StreamDecoder(tok)
    partial = "".join(dec.push(i) for i in emoji[:-1]) + dec.flush()
    assert partial == tok.decode(emoji[:-1])

"""The continuous-batching engine: batched equals alone, seeds, cancellation, memory, bad input."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dijiang_deploy.contract.errors import DiJiangError, PositionLimitError
from dijiang_deploy.contract.statefile import StateFileError
from dijiang_deploy.export import ExportOptions, export_model
from dijiang_deploy.runtime import Engine, Model, QueueFullError, Request, SamplingParams, Session
from dijiang_deploy.testing import random_model


@pytest.fixture(scope="module")
def model(module_tmp) -> Model:
    folder = module_tmp("engine") / "llama"
    export_model(random_model("llama", seed=11), folder, ExportOptions(max_chunk=32))
    return Model.open(folder, load_tokenizer=False, threads=1)


def _alone(model: Model, prompt: list[int], n: int, sampling: SamplingParams | None = None) -> list[int]:
    s = model.session()
    s.append(prompt)
    return s.generate(n, sampling, feed_last=False).token_ids


def _prompts(model: Model, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, model.vocab_size, size=n).tolist() for n in lengths]


def test_eight_requests_arriving_apart_each_get_their_greedy_tokens(model):
    lengths = [1, 5, 33, 64, 129, 300, 451, 600]
    maxes = [7, 30, 3, 19, 12, 25, 9, 16]
    prompts = _prompts(model, lengths)
    want = [_alone(model, p, n) for p, n in zip(prompts, maxes)]
    trace = []
    with Engine(model, max_batch=4, prefill_rows=2, step_tokens=32, on_step=lambda *a: trace.append(a)) as eng:
        handles = []
        for i, (p, n) in enumerate(zip(prompts, maxes)):
            handles.append(eng.submit(Request(p, n, request_id=f"r{i}")))
            time.sleep(0.02 * (i % 3))
        outs = [h.result(timeout=120) for h in handles]
    for i, out in enumerate(outs):
        assert out.finish_reason == "length", (i, out.finish_reason, out.error)
        assert out.token_ids == want[i], f"request {i} (prompt {lengths[i]}) differs from its run alone"
    # More than one request shared decode steps, and the batch never exceeded max_batch.
    assert 2 <= max(len(ids) for kind, ids, _ in trace if kind == "decode") <= 4
    assert all(len(ids) <= 2 for kind, ids, _ in trace if kind == "prefill")


def test_a_long_prompt_is_fed_between_decode_steps(model):
    """While a 600-token prompt is prefilled (32 tokens a step), the decoding stream gets a
    token every scheduler step instead of waiting for the whole prefill."""
    short, long = _prompts(model, [4, 600], seed=3)
    trace = []
    with Engine(model, max_batch=2, prefill_rows=1, step_tokens=32, on_step=lambda *a: trace.append(a)) as eng:
        a = eng.submit(Request(short, 60, request_id="a"))
        it = iter(a)
        next(it)  # a is decoding
        b = eng.submit(Request(long, 2, request_id="b"))
        assert b.result(timeout=120).finish_reason == "length"
        a.result(timeout=120)
    kinds = [(kind, "a" in ids, "b" in ids) for kind, ids, _ in trace]
    b_prefill = [i for i, (kind, _, has_b) in enumerate(kinds) if kind == "prefill" and has_b]
    assert len(b_prefill) >= 600 // 32
    for i in b_prefill[1:]:
        # every prefill chunk of b follows a decode step of a (while a still decodes)
        assert kinds[i - 1] == ("decode", True, False) or not any(k == ("decode", True, False) for k in kinds[i:]), i


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    prompts = _prompts(model, [9, 17, 3, 40, 22, 11], seed=5)
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=1234)
    want = _alone(model, prompts[0], 24, params)
    with Engine(model, max_batch=6) as eng:
        others = [eng.submit(Request(p, 30, SamplingParams(temperature=1.0, seed=i))) for i, p in enumerate(prompts[1:])]
        mine = eng.submit(Request(prompts[0], 24, params))
        assert mine.result(timeout=60).token_ids == want
        for h in others:
            h.result(timeout=60)
    with Engine(model, max_batch=1) as eng:
        assert eng.submit(Request(prompts[0], 24, params)).result(timeout=60).token_ids == want


def test_cancelling_mid_stream_frees_the_slot_within_one_step(model):
    trace = []
    first, second = _prompts(model, [6, 6], seed=7)
    with Engine(model, max_batch=1, on_step=lambda *a: trace.append(a)) as eng:
        a = eng.submit(Request(first, 500, request_id="a"))
        it = iter(a)
        for _ in range(3):
            next(it)
        b = eng.submit(Request(second, 4, request_id="b"))
        mark = len(trace)
        a.cancel()
        out_a = a.result(timeout=30)
        assert out_a.finish_reason == "cancelled" and 3 <= len(out_a.token_ids) < 500
        assert b.result(timeout=30).token_ids == _alone(model, second, 4)
    after = trace[mark:]
    first_b = next(i for i, (_, ids, _) in enumerate(after) if "b" in ids)
    a_steps_after = sum(1 for _, ids, _ in after[:first_b] if "a" in ids)
    assert a_steps_after <= 1, after[: first_b + 1]


def test_a_thousand_requests_leave_memory_flat(model):
    """Bound: resident memory grows by at most 2 MiB from request 200 to request 1000
    (2.6 KB per request; one leaked state row would be 8 KB here, a leaked logits row 400 B x steps)."""
    prompt = _prompts(model, [12], seed=9)[0]
    with Engine(model, max_batch=4) as eng:
        def burst(n):
            hs = [eng.submit(Request(prompt, 3)) for _ in range(n)]
            for h in hs:
                assert h.result(timeout=60).finish_reason == "length"

        burst(200)
        gc.collect()
        before = _rss()
        for _ in range(8):
            burst(100)
        gc.collect()
        after = _rss()
    assert after - before <= 2 * 2**20, (before, after)


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(model, tmp_path):
    prompt = _prompts(model, [10], seed=4)[0]
    other_folder = tmp_path / "other"
    export_model(random_model("gpt_neox", seed=2), other_folder, ExportOptions(max_chunk=16))
    other = Model.open(other_folder, load_tokenizer=False)
    foreign = other.session()
    foreign.append([1, 2, 3])
    with Engine(model, max_batch=2, max_queue=3, max_context=200) as eng:
        running = eng.submit(Request(prompt, 40))
        for bad, match in [
            (Request([], 4), "empty prompt"),
            (Request([model.vocab_size + 5], 4), "outside this model's vocabulary"),
            (Request(prompt, 0), "max_new_tokens"),
            (Request(prompt, 195), "context limit of 200"),
            (Request(prompt, 4, start=foreign.snapshot()), "another model|layers"),
        ]:
            with pytest.raises(DiJiangError, match=match):
                eng.submit(bad)
        with pytest.raises(StateFileError):
            eng.submit(Request(prompt, 4, start=foreign))
        for kwargs, name in [({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                             ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
                             ({"presence_penalty": 3.0}, "presence_penalty"), ({"temperature": float("nan")}, "temperature")]:
            with pytest.raises(DiJiangError, match=name):
                SamplingParams(**kwargs)
        assert running.result(timeout=60).token_ids == _alone(model, prompt, 40)
        # The waiting queue is bounded.
        blockers = [eng.submit(Request(prompt, 180)) for _ in range(2)]
        deadline = time.time() + 30
        while eng.running < 2 and time.time() < deadline:  # both admitted: the queue is empty again
            time.sleep(0.005)
        queued = [eng.submit(Request(prompt, 2)) for _ in range(3)]
        with pytest.raises(QueueFullError):
            eng.submit(Request(prompt, 2))
        for h in blockers:
            h.cancel()
        assert all(h.result(timeout=60).finish_reason == "length" for h in queued)


def test_general_decay_position_limit_through_the_engine(tmp_path):
    import torch

    m = random_model("llama", seed=3)
    with torch.no_grad():
        for layer in m.attention_layers():
            layer.D1.mul_(1.0 + 0.01 * torch.rand_like(layer.D1))
            layer.refresh_decay()
    export_model(m, tmp_path / "gen", ExportOptions(max_chunk=16))
    model = Model.open(tmp_path / "gen", load_tokenizer=False)
    limit = model.manifest.position_limit
    with Engine(model) as eng:
        with pytest.raises(PositionLimitError):
            eng.submit(Request([1] * (limit + 1), 4))
        out = eng.submit(Request([1 + i % 90 for i in range(limit - 5)], 50)).result(timeout=120)
    assert out.finish_reason == "position_limit" and len(out.token_ids) <= 5


def test_a_request_continues_a_session_and_hands_its_state_back(model):
    first, second = _prompts(model, [20, 7], seed=12)
    straight = model.session()
    straight.append(first)
    straight.generate(5)
    straight.append(second)
    want = straight.generate(6).token_ids

    s = model.session()
    s.append(first)
    with Engine(model) as eng:
        eng.submit(Request([], 5, start=s)).result(timeout=60)  # continues from s's logits
        assert s.position == len(first) + 5, "the state covers the generated tokens"
        out = eng.submit(Request(second, 6, start=s, return_state=True, return_prompt_state=True)).result(timeout=60)
    assert out.token_ids == want and out.cached_tokens == len(first) + 5
    assert out.prompt_state.position == len(first) + 5 + len(second)
    assert out.state.position == s.position == straight.position
    for x, y in zip(s.layers(), straight.layers()):
        assert np.abs(x - y).max() <= 1e-5
    resumed = Session(model, out.prompt_state)
    assert resumed.generate(6, feed_last=False).token_ids == want


def test_stop_token_ids_and_async_streaming(model):
    import asyncio

    prompt = _prompts(model, [8], seed=13)[0]
    full = _alone(model, prompt, 20)
    stop_at = full[5]
    cut = full[: full.index(stop_at) + 1]

    async def run():
        with Engine(model) as eng:
            h = await eng.asubmit(Request(prompt, 20, stop_token_ids=[stop_at]))
            got = [ev.token_id async for ev in h.stream()]
            return got, h.output

    got, out = asyncio.run(run())
    assert got == cut and out.token_ids == cut and out.finish_reason == "stop"


def test_submit_from_many_threads(model):
    prompts = _prompts(model, [3, 9, 27, 81], seed=14)
    want = [_alone(model, p, 8) for p in prompts]
    results = {}
    with Engine(model, max_batch=3) as eng:
        def client(i):
            results[i] = eng.submit(Request(prompts[i], 8)).result(timeout=60).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [results[i] for i in range(4)] == want


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_step_costs_fit_a_line_and_size_the_budget():
    from dijiang_deploy.runtime.step_costs import StepCosts

    costs = StepCosts()
    assert costs.budget(2.0) == StepCosts.UNTIMED_BUDGET  # nothing timed yet
    for n in (1, 4, 16, 64):
        costs.prefilled(n, 0.020 + 0.002 * n)  # 20 ms fixed, 2 ms per position
    a, b = costs.prefill_line()
    assert a == pytest.approx(0.020, rel=1e-6) and b == pytest.approx(0.002, rel=1e-6)
    costs.decoded(0.031)
    # A prefill step may add (itl_ratio - 1) decode steps: (1.0 * 31 - 20) / 2 = 5.5 -> 5 positions.
    assert costs.budget(2.0) == 5
    assert costs.budget(1.5) == 1  # no room past the fixed cost: still one position a step
    one = StepCosts()
    one.prefilled(16, 0.032)  # a single step size: no intercept can be fitted
    assert one.prefill_line() == (0.0, 0.002)


def test_warm_up_times_the_prefill_shapes_so_the_first_chunk_is_sized_from_them(model):
    with Engine(model, max_batch=2, prefill_rows=1) as cold:
        assert cold.costs.prefill_line() is None
    with Engine(model, max_batch=2, prefill_rows=1, warmup=True) as warm:
        line = warm.costs.prefill_line()
        assert line is not None and line[1] > 0
        # Every prefill shape was timed: the fit spans 1 .. max_chunk positions.
        w, sn = warm.costs._sums[0], warm.costs._sums[1]
        assert sn / w > 1  # a mean above one position: more than the 1-token shape was seen
        assert w > len(model.prefill_lengths) * 0.95 ** len(model.prefill_lengths) - 1e-9


def test_decode_lanes_update_states_in_place_only_where_the_graph_allows_it(model):
    graph = model.graph
    # The inline graph's one-token branch reads each past state before it
    # writes the present one; its chunk branch does not, and the check sees it.
    assert graph.in_place_safe(1)
    assert not graph.in_place_safe(16)
    decode = model.lane(4, (1,))
    assert decode.in_place and decode.buffer_nbytes() == model.manifest.state_bytes(4)
    prefill = model.lane(4, model.prefill_lengths)
    assert not prefill.in_place and prefill.buffer_nbytes() == 2 * model.manifest.state_bytes(4)
    with pytest.raises(ValueError, match="in place"):
        model.lane(2, (1, 16), in_place=True)


def test_in_place_and_ping_pong_decode_agree_bit_for_bit(model):
    rng = np.random.default_rng(5)
    h, d1, d2 = model.manifest.state_shape
    starts = [[(0.1 * rng.standard_normal((h, d1, d2))).astype(np.float32) for _ in range(model.manifest.num_layers)]
              for _ in range(3)]
    lanes = [model.lane(4, (1,), in_place=True), model.lane(4, (1,), in_place=False)]
    for lane in lanes:
        for i, layers in enumerate(starts):
            lane.write_row(i, layers, position=10 + i)
    for _ in range(6):
        ids = rng.integers(0, model.vocab_size, (3, 1))
        a, b = (np.array(lane.step(ids, np.ones_like(ids))) for lane in lanes)
        assert np.array_equal(a, b)
    lanes[0].move_row(2, 0)
    lanes[1].move_row(2, 0)
    for i in range(2):
        for x, y in zip(lanes[0].read_row(i), lanes[1].read_row(i)):
            assert np.array_equal(x, y)
    # and the states really moved on from where they started
    assert not np.array_equal(lanes[0].read_row(1)[0], starts[1][0])

"""The three attention forms agree; decay detection and its two paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dijiang_deploy.contract.errors import PositionLimitError
from dijiang_deploy.modeling import recurrence
from dijiang_deploy.modeling.decay import analyse_tables, build_tables
from dijiang_deploy.config import DiJiangSettings
from dijiang_deploy.testing import random_model

TOL = 1e-4  # float32 max abs logit difference between forms (issue #2)


def _logits(model, ids, mode, **kw):
    with torch.no_grad():
        return model(ids, mode=mode, **kw).logits


@pytest.mark.parametrize("n", [1, 7, 64, 150])
def test_three_modes_agree(tiny_model, n):
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, n))
    par = _logits(tiny_model, ids, "parallel")
    chk = _logits(tiny_model, ids, "chunked", chunk_size=64)
    rec = _logits(tiny_model, ids, "recurrent")
    assert par.shape == (3, n, tiny_model.config.vocab_size)
    assert (par - chk).abs().max() <= TOL
    assert (par - rec).abs().max() <= TOL


def test_states_agree_and_continue(tiny_model):
    """Prefill in chunks then decode token by token equals one parallel pass."""
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 100))
    full = tiny_model(ids, "parallel")
    with torch.no_grad():
        first = tiny_model(ids[:, :70], "chunked", chunk_size=16)
        rest = tiny_model(ids[:, 70:], "recurrent", state=first.state)
    stitched = torch.cat([first.logits, rest.logits], dim=1)
    assert (stitched - full.logits).abs().max() <= TOL
    for a, b in zip(rest.state.layers, full.state.layers):
        assert a.dtype == torch.float32 and a.shape == (2, *tiny_model.config.state_shape)
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
    assert rest.state.position.tolist() == [100, 100]


def test_recurrence_forms_match_numpy_scan():
    """The torch forms against an independent float64 numpy loop."""
    rng = np.random.default_rng(0)
    b, h, n, d = 2, 3, 37, 8
    q, k, v = (rng.random((b, h, n, d)) for _ in range(3))
    g = -rng.random((b, h, n)) * 0.1
    s0 = rng.standard_normal((b, h, d, d))
    s = s0.copy()
    ref = np.zeros((b, h, n, d))
    for t in range(n):
        s = np.exp(g[:, :, t])[..., None, None] * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        ref[:, :, t] = np.einsum("bhi,bhij->bhj", q[:, :, t], s)
    tt = [torch.tensor(x, dtype=torch.float32) for x in (q, k, v, g, s0)]
    for name, fn in (("parallel", recurrence.parallel), ("recurrent", recurrence.recurrent)):
        o, st = fn(*tt)
        assert np.abs(o.numpy() - ref).max() < 1e-4, name
        assert np.abs(st.numpy() - s).max() < 1e-4, name
    o, st = recurrence.chunked(*tt, chunk_size=8)
    assert np.abs(o.numpy() - ref).max() < 1e-4
    assert np.abs(st.numpy() - s).max() < 1e-4


def test_padding_leaves_state_untouched(tiny_model):
    """A left-padded row gives the same logits as the unpadded row alone."""
    v = tiny_model.config.vocab_size
    short = torch.randint(0, v, (1, 9))
    long = torch.randint(0, v, (1, 14))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    for mode in ("parallel", "chunked", "recurrent"):
        out = tiny_model(batch, mode, attention_mask=mask, chunk_size=4)
        alone = tiny_model(short, "parallel")
        assert (out.logits[0, 5:] - alone.logits[0]).abs().max() <= TOL, mode
        assert (out.logits[1] - tiny_model(long, "parallel").logits[0]).abs().max() <= TOL, mode
        assert out.state.position.tolist() == [9, 14]


def test_geometric_tables_detected(family):
    model = random_model(family, seed=1)
    settings = model.config.dijiang
    for attn in model.attention_layers():
        assert attn.geometric
        expected = np.log([1 - np.exp(x) for x in np.linspace(np.log(settings.decay_fast), np.log(settings.decay_slow), attn.num_heads)])
        assert np.allclose(attn.log_gamma.numpy(), expected, rtol=1e-5)
    assert model.position_limit is None


def test_analysis_on_fp32_and_fp16_tables():
    d1, d2 = build_tables(8, 2048, DiJiangSettings())
    assert analyse_tables(d1.float(), d2.float()).geometric
    # fp16 tables overflow (D2) and underflow (D1) far out; the finite part still fits.
    assert analyse_tables(d1.half(), d2.half()).geometric
    noisy = d1 * (1 + 0.05 * torch.rand_like(d1))
    result = analyse_tables(noisy, d2)
    assert not result.geometric and max(result.max_log_error) > 1e-3


def _make_general(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for attn in model.attention_layers():
        with torch.no_grad():
            attn.D1.mul_(1 + 0.2 * torch.rand(attn.D1.shape, generator=gen, dtype=attn.D1.dtype))
            attn.D2.mul_(1 + 0.2 * torch.rand(attn.D2.shape, generator=gen, dtype=attn.D2.dtype))
    model.refresh_decay()
    return model


def test_general_tables_take_general_path_and_agree(family):
    model = _make_general(random_model(family, seed=2, max_position_embeddings=300), seed=1)
    assert not any(a.geometric for a in model.attention_layers())
    ids = torch.randint(0, model.config.vocab_size, (2, 90))
    par = _logits(model, ids, "parallel")
    assert (par - _logits(model, ids, "chunked", chunk_size=32)).abs().max() <= TOL
    assert (par - _logits(model, ids, "recurrent")).abs().max() <= TOL
    # The general form really differs from the geometric one on these tables.
    geo = random_model(family, seed=2, max_position_embeddings=300)
    assert (par - _logits(geo, ids, "parallel")).abs().max() > 1e-3


def test_general_tables_refuse_positions_past_table():
    model = _make_general(random_model("gpt_neox", seed=2), seed=1)
    model.config.dijiang.table_length  # tables are 2048 long
    state = model.new_state(1)
    state.position[:] = 2040
    with pytest.raises(PositionLimitError, match="2048"):
        model(torch.zeros(1, 10, dtype=torch.long), "recurrent", state=state)


def test_geometric_runs_past_table_length():
    model = random_model("gpt_neox", seed=4)
    assert model.attention_layers()[0].table_length == 2048
    ids = torch.randint(0, model.config.vocab_size, (1, 2100))
    with torch.no_grad():
        pre = model(ids[:, :2040], "chunked", chunk_size=256)
        dec = model(ids[:, 2040:], "recurrent", state=pre.state)
        ref = model(ids, "chunked", chunk_size=128)
    assert torch.isfinite(dec.logits).all()
    assert all(torch.isfinite(s).all() for s in dec.state.layers)
    assert (dec.logits - ref.logits[:, 2040:]).abs().max() <= TOL
    assert int(dec.state.position) == 2100


def test_half_precision_keeps_state_and_tables_fp32(family):
    model = random_model(family, seed=1).cast(torch.bfloat16)
    attn = model.attention_layers()[0]
    assert attn.D1.dtype in (torch.float32, torch.float64) and attn.W_G.dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    out = model(ids, "chunked", chunk_size=8)
    assert out.state.layers[0].dtype == torch.float32
    ref = random_model(family, seed=1)(ids, "parallel").logits
    assert torch.isfinite(out.logits).all()
    assert (out.logits.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.8


def test_gqa_state_is_per_query_head():
    model = random_model("llama", seed=0)
    assert model.config.num_kv_heads < model.config.num_heads
    out = model(torch.zeros(2, 3, dtype=torch.long), "recurrent")
    assert out.state.layers[0].shape == (2, model.config.num_heads, model.config.head_dim, model.config.head_dim)

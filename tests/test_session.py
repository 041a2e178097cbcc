"""Sessions: resume equals one-shot, state files, fork, chat turn by turn, no torch at run time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dijiang_deploy.contract.errors import DiJiangError
from dijiang_deploy.contract.statefile import SequenceState, StateFileError
from dijiang_deploy.export import ExportOptions, export_model
from dijiang_deploy.runtime import Model, Session
from dijiang_deploy.testing import random_model
from _support import requires_smollm2


@pytest.fixture(scope="module")
def exports(module_tmp) -> dict[str, Path]:
    root = module_tmp("sessions")
    out = {}
    for family in ("gpt_neox", "llama"):
        out[family] = root / family
        export_model(random_model(family, seed=7), out[family], ExportOptions(max_chunk=16))
    return out


def _resume_in_new_process(folder: Path, state: Path, b: list[int], n: int) -> dict:
    """Load ``state`` in a fresh interpreter, prefill ``b``, generate ``n`` greedy tokens."""
    code = textwrap.dedent(f"""
        import json, sys
        from dijiang_deploy.runtime import Model, Session
        model = Model.open({str(folder)!r}, load_tokenizer=False)
        s = Session.load(model, {str(state)!r})
        logits = s.append({b!r})
        out = s.generate({n}, feed_last=False)
        json.dump({{"logits": logits.tolist(), "tokens": out.token_ids, "torch": "torch" in sys.modules}}, sys.stdout)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_resume_in_a_new_process_equals_one_shot(exports, tmp_path, family):
    folder = exports[family]
    model = Model.open(folder, load_tokenizer=False)
    rng = np.random.default_rng(1)
    a = rng.integers(0, model.vocab_size, size=37).tolist()
    b = rng.integers(0, model.vocab_size, size=21).tolist()
    first = model.session()
    first.append(a)
    first.save(tmp_path / "a.djstate")
    resumed = _resume_in_new_process(folder, tmp_path / "a.djstate", b, 24)
    assert not resumed["torch"], "the runtime must not import torch"
    whole = model.session()
    logits = whole.append(a + b)
    assert np.abs(np.array(resumed["logits"]) - logits).max() <= 1e-4
    assert resumed["tokens"] == whole.generate(24, feed_last=False).token_ids


def test_three_turns_resumed_each_time_equal_one_conversation(exports, tmp_path):
    """A chat whose every turn runs in a new session loaded from the last one's file
    ends in the same state and tokens as one session that never stopped."""
    model = Model.open(exports["llama"], load_tokenizer=False)
    rng = np.random.default_rng(2)
    turns = [rng.integers(0, model.vocab_size, size=n).tolist() for n in (19, 5, 33)]
    straight = model.session()
    want = []
    for t in turns:
        straight.append(t)
        want.append(straight.generate(9).token_ids)
    got, path = [], tmp_path / "turn.djstate"
    for i, t in enumerate(turns):
        s = model.session() if i == 0 else Session.load(model, path)
        s.append(t)
        got.append(s.generate(9).token_ids)
        s.save(path)
    assert got == want
    final = Session.load(model, path)
    assert final.tokens == straight.tokens
    for x, y in zip(final.layers(), straight.layers()):
        assert np.abs(x - y).max() <= 1e-5


def test_state_file_round_trip_and_every_damage_is_named(exports, tmp_path):
    model = Model.open(exports["llama"], load_tokenizer=False)
    s = model.session()
    s.append([3, 4, 5, 6])
    s.generate(3, sampling=__import__("dijiang_deploy").runtime.SamplingParams(temperature=1.0, seed=5))
    data = s.to_bytes()
    back = Session.from_bytes(model, data)
    assert back.tokens == s.tokens and np.array_equal(back.logits, s.logits)
    assert back.rng.state == s.rng.state
    for x, y in zip(back.layers(), s.layers()):
        assert np.array_equal(x, y)
    assert back.to_bytes() == data, "the format is deterministic"

    def refused(blob: bytes, match: str, other=model):
        with pytest.raises(StateFileError, match=match):
            Session.from_bytes(other, blob)

    refused(data[: len(data) - 100], "truncated")
    refused(data[:10], "truncated|bad magic")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    refused(bytes(flipped), "checksum")
    wrong_version = bytearray(data)
    wrong_version[8] = 9
    refused(bytes(wrong_version), "version 9; this build reads version 1")
    refused(b"PK\x03\x04" + data[4:], "not a dijiang-deploy state file")
    refused(data + b"\x00", "trailing")
    other = Model.open(exports["gpt_neox"], load_tokenizer=False)
    refused(data, "another model|layers", other=other)
    with pytest.raises(StateFileError, match="no such state file"):
        Session.load(model, tmp_path / "missing.djstate")
    # A failed save leaves the previous file intact (atomic write).
    path = s.save(tmp_path / "s.djstate")
    before = path.read_bytes()
    s.tokens.append(model.vocab_size)  # not a token of this model: the write is refused
    with pytest.raises(StateFileError, match="outside the vocabulary"):
        s.save(path)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.djstate")]


def test_same_export_twice_shares_a_fingerprint_and_another_does_not(exports, tmp_path):
    m = random_model("llama", seed=7)
    export_model(m, tmp_path / "again", ExportOptions(max_chunk=16))
    export_model(m, tmp_path / "other-chunk", ExportOptions(max_chunk=8))
    fp = Model.open(exports["llama"], load_tokenizer=False).identity.fingerprint
    assert Model.open(tmp_path / "again", load_tokenizer=False).identity.fingerprint == fp
    assert Model.open(tmp_path / "other-chunk", load_tokenizer=False).identity.fingerprint != fp


def test_fork_is_independent(exports):
    model = Model.open(exports["gpt_neox"], load_tokenizer=False)
    s = model.session()
    s.append([1, 2, 3, 4, 5])
    f = s.fork()
    a = s.generate(6).token_ids
    assert f.position == 5, "generating on the parent does not move the fork"
    assert f.generate(6).token_ids == a
    f.append([9, 9])
    assert s.position == 5 + 6 and f.position == 5 + 6 + 2


def test_bad_input(exports):
    model = Model.open(exports["llama"], load_tokenizer=False)
    s = model.session()
    with pytest.raises(DiJiangError, match="append a prompt"):
        s.generate(4)
    with pytest.raises(DiJiangError, match="outside this model's vocabulary"):
        s.append([model.vocab_size])
    with pytest.raises(DiJiangError, match="no tokenizer"):
        s.append("text")
    with pytest.raises(DiJiangError, match="integers"):
        s.append([1.5])
    assert s.position == 0, "a refused append feeds nothing"


def test_position_limit_of_general_decay_tables(tmp_path):
    import torch

    model = random_model("llama", seed=3)
    with torch.no_grad():
        for layer in model.attention_layers():
            layer.D1.mul_(1.0 + 0.01 * torch.rand_like(layer.D1))  # no longer geometric
            layer.refresh_decay()
    export_model(model, tmp_path / "gen", ExportOptions(max_chunk=16))
    m = Model.open(tmp_path / "gen", load_tokenizer=False)
    limit = m.manifest.position_limit
    assert limit is not None
    s = m.session()
    ids = [1 + i % 90 for i in range(limit + 1)]
    with pytest.raises(DiJiangError, match="past this model's limit"):
        s.append(ids)
    s.append(ids[: limit - 4])
    out = s.generate(50)
    assert out.finish_reason == "position_limit" and s.position <= limit


# -- chat with a real tokenizer (the SmolLM2 vocabulary over a tiny random model) --------------------


@pytest.fixture(scope="module")
def chat_model(smollm2_dir, module_tmp) -> Model:
    folder = module_tmp("chat") / "onnx"
    export_model(random_model("llama", seed=0, vocab_size=49152), folder, ExportOptions(max_chunk=32),
                 tokenizer_dir=smollm2_dir)
    return Model.open(folder)


@requires_smollm2
@pytest.mark.parametrize("system", [None, "You answer in one word."])
def test_chat_feeds_only_each_turns_new_tokens(chat_model, system):
    """At every turn what the session has fed when it starts answering is exactly the
    conversation rendered in one go, a turn feeds only what it adds to that rendering,
    and after the turn the state is a prefix of the whole conversation's rendering."""
    tok = chat_model.tokenizer
    s = chat_model.session()
    if system is not None:
        s.chat(system, role="system", max_new_tokens=1)  # a system turn, answered minimally
    for question in ("What is the capital of France?", "And of Japan?", "Thanks!"):
        fed_before = s.position
        s.chat(question, max_new_tokens=8)
        asked = tok.encode_chat(s.messages[:-1], add_generation_prompt=True)
        assert s._checkpoint.tokens.tolist() == asked, "fed tokens differ from the one-go rendering"
        assert s.last_prefill[0] == len(asked) - fed_before, "the turn re-fed history"
        closed = tok.encode_chat(s.messages, add_generation_prompt=False)
        assert closed[: s.position] == s.tokens
    if system is not None:
        assert s.messages[0].role == "system" and "one word" in tok.render_chat(s.messages[:1])


@requires_smollm2
def test_chat_rewinds_when_the_rendering_diverges(chat_model):
    s = chat_model.session()
    s.chat("Hello there", max_new_tokens=6)
    before = s.rewinds
    s.messages[-1] = type(s.messages[-1])("assistant", "something else entirely")  # history rewritten
    s.chat("Go on", max_new_tokens=4)
    assert s.rewinds >= before + 1
    asked = chat_model.tokenizer.encode_chat(s.messages[:-1], add_generation_prompt=True)
    assert s._checkpoint.tokens.tolist() == asked


@requires_smollm2
def test_template_with_a_system_prompt_renders_as_transformers_does(chat_model):
    """Our Jinja rendering (no transformers) against transformers' apply_chat_template."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(chat_model.folder))
    for msgs in (
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2? 🎉"}],
    ):
        for gen_prompt in (True, False):
            want = hf.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=False)
            assert chat_model.tokenizer.render_chat(msgs, gen_prompt) == want
            ids = hf.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert chat_model.tokenizer.encode_chat(msgs, gen_prompt) == list(ids)


@requires_smollm2
def test_a_full_generate_imports_neither_torch_nor_the_model_code(chat_model, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from dijiang_deploy.runtime import Generator, Model
        gen = Generator(Model.open({str(chat_model.folder)!r}))
        out = gen.generate("Hello", chat=True, max_new_tokens=5)
        s = gen.model.session(); s.append("Hi"); s.generate(3); s.save({str(tmp_path / "x.djstate")!r})
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "onnx.", "transformers"))
                     or m == "onnx" or m.startswith("dijiang_deploy.modeling") or m == "dijiang_deploy.checkpoint")
        print(bad)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
    assert SequenceState.load(tmp_path / "x.djstate").position > 0


@requires_smollm2
@pytest.mark.slow
def test_smollm2_resume_equals_one_shot(smollm2_dir, tmp_path):
    """The real model: (prefill A, save, new process, prefill B, generate) against A+B at once."""
    from dijiang_deploy import load_model

    folder = tmp_path / "onnx"
    export_model(load_model(smollm2_dir), folder, ExportOptions(), tokenizer_dir=smollm2_dir)
    model = Model.open(folder)
    a = model.tokenizer.encode("Linear attention keeps a running summary of fixed size, so a conversation")
    b = model.tokenizer.encode(" can be saved, moved and resumed exactly. The next token is")
    s = model.session()
    s.append(a)
    s.save(tmp_path / "a.djstate")
    resumed = _resume_in_new_process(folder, tmp_path / "a.djstate", b, 16)
    whole = model.session()
    logits = whole.append(a + b)
    assert np.abs(np.array(resumed["logits"]) - logits).max() <= 1e-4
    assert resumed["tokens"] == whole.generate(16, feed_last=False).token_ids

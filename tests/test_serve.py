"""``dijiang-deploy serve``: a real server process on 127.0.0.1, driven by the official ``openai`` client.

A tiny random LLaMA with SmolLM2's vocabulary and tokenizer keeps the tests
fast while the text path (chat template, detokenizer, stop strings) is real.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from dijiang_deploy.export import ExportOptions, export_model
from dijiang_deploy.testing import random_model
from _server import ServerProcess
from _support import requires_smollm2

pytestmark = requires_smollm2
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def export(smollm2_dir, module_tmp) -> Path:
    folder = module_tmp("serve") / "tiny-smol"
    export_model(random_model("llama", seed=0, vocab_size=49152, eos_token_id=2), folder, ExportOptions(max_chunk=16),
                 tokenizer_dir=smollm2_dir)
    return folder


@pytest.fixture(scope="module")
def server(export, module_tmp):
    with ServerProcess(export, "--max-batch", "4", "--max-queue", "16", "--max-context", "2048",
                       "--state-dir", str(module_tmp("states"))) as srv:
        yield srv


def _client(srv: ServerProcess, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=60)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_chat_and_completions(server):
    client = _client(server)
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-smol"]
    out = client.chat.completions.create(model="tiny-smol", messages=CHAT, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    assert tokens["count"] == out.usage.prompt_tokens
    comp = client.completions.create(model="tiny-smol", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert comp.object == "text_completion" and comp.choices[0].finish_reason == "length"
    assert comp.usage.completion_tokens == 8
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.startswith("<|im_start|>") and "capital of France" in text


def test_streaming_equals_the_whole_answer(server):
    client = _client(server)
    whole = client.chat.completions.create(model="tiny-smol", messages=CHAT, max_tokens=16, temperature=0, seed=1)
    stream = client.chat.completions.create(model="tiny-smol", messages=CHAT, max_tokens=16, temperature=0, seed=1,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # The raw events are OpenAI's: "data: {...}" lines ending with "data: [DONE]".
    raw = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-smol", "prompt": "Hi", "max_tokens": 3,
                                                             "stream": True}, timeout=60).text
    events = [line for line in raw.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_eight_concurrent_streams_get_their_own_answers(server):
    client = _client(server)
    prompts = [f"Tell me about the number {i}." for i in range(8)]
    want = [client.completions.create(model="tiny-smol", prompt=p, max_tokens=10, temperature=0).choices[0].text
            for p in prompts]
    got: dict[int, str] = {}

    def run(i: int) -> None:
        stream = client.completions.create(model="tiny-smol", prompt=prompts[i], max_tokens=10, temperature=0, stream=True)
        got[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(8)] == want


def _metric(srv: ServerProcess, name: str) -> float:
    for line in httpx.get(f"{srv.url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_closing_a_stream_cancels_it_and_frees_the_slot(server):
    client = _client(server)
    stream = client.completions.create(model="tiny-smol", prompt="Count forever:", max_tokens=1900, temperature=0,
                                       stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.time() + 20
    while _metric(server, "dijiang_requests_running") > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert _metric(server, "dijiang_requests_running") == 0
    assert client.completions.create(model="tiny-smol", prompt="Hi", max_tokens=2).choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, status, code, param", [
    ({"model": "tiny-smol"}, 400, "invalid_request", "messages"),
    ({"model": "tiny-smol", "messages": []}, 400, "invalid_request", "messages"),
    ({"model": "tiny-smol", "messages": CHAT, "temperature": "hot"}, 400, "invalid_request", "temperature"),
    ({"model": "tiny-smol", "messages": CHAT, "temperature": 3}, 400, "invalid_request", "temperature"),
    ({"model": "tiny-smol", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request", None),
    ({"model": "gpt-5", "messages": CHAT}, 400, "model_not_found", "model"),
    ({"model": "tiny-smol", "messages": CHAT, "max_tokens": 5000}, 400, "context_length_exceeded", "max_tokens"),
    ({"model": "tiny-smol", "messages": CHAT, "n": 99}, 400, "invalid_request", "n"),
    ({"model": "tiny-smol", "messages": CHAT, "logprobs": True}, 400, None, "logprobs"),
    ({"model": "tiny-smol", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "unsupported_content", "messages"),
])
def test_bad_requests_are_400s_with_the_openai_error_body(server, body, status, code, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and (param is None or (err["param"] or "").startswith(param))


def test_malformed_json_huge_body_and_unknown_routes(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/v1/completions", content=b"x" * (9 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    # The engine still serves after all of that.
    assert httpx.post(f"{server.url}/v1/completions", json={"model": "tiny-smol", "prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_n_choices_fork_one_prefill(server):
    client = _client(server)
    out = client.chat.completions.create(model="tiny-smol", messages=CHAT, max_tokens=6, temperature=1.0, seed=3, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="tiny-smol", messages=CHAT, max_tokens=6, temperature=1.0, seed=3, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices], "seeded"


def _second_turn(client, first):
    reply = first.choices[0].message.content
    return CHAT + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And of Japan?"}]


def test_turn_two_resumes_from_turn_ones_state(server, export):
    client = _client(server)
    first = client.chat.completions.create(model="tiny-smol", messages=CHAT, max_tokens=10, temperature=0)
    history = _second_turn(client, first)
    second = client.chat.completions.create(model="tiny-smol", messages=history, max_tokens=10, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    turn1 = first.usage.prompt_tokens + first.usage.completion_tokens
    closed = httpx.post(f"{server.url}/tokenize", json={"messages": history[:2], "add_generation_prompt": False}).json()
    # The state after turn 1 covers its prompt and completion; when the answer does not
    # re-tokenize to the tokens generated, the server re-fed the answer canonically (through
    # the end of the assistant turn) so that the next rendering still starts with a state.
    assert cached in (turn1, closed["count"]), (cached, turn1, closed["count"])
    assert second.usage.prompt_tokens > cached > first.usage.prompt_tokens
    with ServerProcess(export, "--state-cache-mib", "0") as plain:
        fresh = _client(plain).chat.completions.create(model="tiny-smol", messages=history, max_tokens=10, temperature=0)
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.choices[0].message.content == second.choices[0].message.content


def test_a_restarted_server_keeps_its_warm_conversations(export, tmp_path):
    state_dir = tmp_path / "states"
    with ServerProcess(export, "--state-dir", str(state_dir)) as srv:
        first = _client(srv).chat.completions.create(model="tiny-smol", messages=CHAT, max_tokens=8, temperature=0)
    assert srv.returncode == 0
    assert list(state_dir.glob("*.djstate")), "snapshots were flushed on shutdown"
    with ServerProcess(export, "--state-dir", str(state_dir)) as srv:
        again = _client(srv).chat.completions.create(model="tiny-smol", messages=_second_turn(None, first),
                                                     max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens


def test_sigterm_finishes_in_flight_requests_and_exits_zero(export, tmp_path):
    srv = ServerProcess(export, "--grace-seconds", "20")
    srv.start()
    results = {}

    def run() -> None:
        results["out"] = _client(srv).completions.create(model="tiny-smol", prompt="Go", max_tokens=300, temperature=0)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    srv.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert srv.proc.wait(60) == 0
    assert results["out"].choices[0].finish_reason == "length" and results["out"].usage.completion_tokens == 300


def test_api_key_and_the_public_routes(export):
    with ServerProcess(export, "--api-key", "s3cret") as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        assert httpx.get(f"{srv.url}/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            _client(srv, "wrong").models.list()
        r = httpx.get(f"{srv.url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert [m.id for m in _client(srv, "s3cret").models.list().data] == ["tiny-smol"]


def test_a_full_queue_is_a_429_with_retry_after(export):
    with ServerProcess(export, "--max-batch", "1", "--max-queue", "1") as srv:
        codes, headers = [], []

        def run() -> None:
            r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny-smol", "prompt": "Go", "max_tokens": 200},
                           timeout=120)
            codes.append(r.status_code)
            headers.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=run) for _ in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(120)
        assert codes.count(200) >= 2 and 429 in codes, codes
        assert all(h == "1" for c, h in zip(codes, headers) if c == 429)


def test_saved_states_move_between_servers(export, tmp_path):
    convo = CHAT + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Why?"}]
    with ServerProcess(export) as a:
        made = httpx.post(f"{a.url}/v1/states", json={"messages": convo}).json()
        blob = httpx.get(f"{a.url}/v1/states/{made['id']}").content
        assert httpx.get(f"{a.url}/v1/states/nope").status_code == 404
        assert httpx.delete(f"{a.url}/v1/states/{made['id']}").json()["deleted"] is True
    with ServerProcess(export) as b:
        up = httpx.put(f"{b.url}/v1/states/moved", content=blob)
        assert up.status_code == 200 and up.json()["tokens"] == made["tokens"]
        out = _client(b).chat.completions.create(model="tiny-smol", messages=convo, max_tokens=4, temperature=0)
        assert out.usage.prompt_tokens_details.cached_tokens == made["tokens"] == out.usage.prompt_tokens
        bad = httpx.put(f"{b.url}/v1/states/broken", content=blob[:-10])
        assert bad.status_code == 400 and "truncated" in bad.json()["error"]["message"]


def test_metrics_and_health(server):
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("dijiang_requests_total", "dijiang_time_to_first_token_seconds_bucket",
                 "dijiang_time_per_output_token_seconds_bucket", "dijiang_e2e_request_latency_seconds_bucket",
                 "dijiang_requests_running", "dijiang_requests_waiting", "dijiang_prompt_tokens_total",
                 "dijiang_generation_tokens_total", "dijiang_state_cache_hits_total", "dijiang_state_cache_misses_total",
                 "dijiang_state_cache_evictions_total", "dijiang_state_cache_bytes"):
        assert name in text, name
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


@pytest.mark.slow
def test_smollm2_behind_the_server(smollm2_dir, tmp_path):
    """The real model end to end: its chat template, a multi-turn conversation resumed from the cache."""
    from dijiang_deploy import load_model

    folder = tmp_path / "smollm2"
    export_model(load_model(smollm2_dir), folder, ExportOptions(), tokenizer_dir=smollm2_dir)
    with ServerProcess(folder) as srv:
        client = _client(srv)
        first = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=16, temperature=0)
        second = client.chat.completions.create(model="smollm2", messages=_second_turn(client, first), max_tokens=16,
                                                temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_the_multi_turn_client_example_resumes_from_the_servers_state(server):
    example = Path(__file__).resolve().parents[1] / "examples" / "server_chat.py"
    proc = subprocess.run(
        [sys.executable, str(example), "--base-url", f"{server.url}/v1", "--prompt", "Hello there",
         "--prompt", "And what next?", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    usage = [line for line in proc.stderr.splitlines() if line.startswith("[prompt ")]
    assert len(usage) == 2
    prompt1 = int(usage[0].split()[1])
    completion1 = int(usage[0].split("; ")[1].split()[0])
    cached1, cached2 = (int(u.split(", ")[1].split()[0]) for u in usage)
    # Turn 2 starts from what turn 1 left: its prompt and its answer come from the cache.
    assert cached2 == prompt1 + completion1 and cached2 > cached1


def test_the_prefill_budget_flags_reach_the_engine(export):
    from dijiang_deploy.cli import main
    from dijiang_deploy.contract.errors import DiJiangError
    from dijiang_deploy.serving.core import ServeOptions, ServerCore

    core = ServerCore(ServeOptions(export_dir=export, step_tokens=8, itl_ratio=3.5, warmup=False))
    core.load()
    try:
        assert core.error is None, core.error
        assert core.engine.step_tokens == 8 and core.engine.itl_ratio == 3.5
    finally:
        core.close()
    for bad in ({"step_tokens": 0}, {"itl_ratio": 1.0}):
        with pytest.raises(DiJiangError, match="--step-tokens|--itl-ratio"):
            ServerCore(ServeOptions(export_dir=export, **bad))
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(export), "--itl-ratio", "0.5"])
    assert exc.value.code == 2

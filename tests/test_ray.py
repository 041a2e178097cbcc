"""``dijiang-deploy serve --ray``: a real local Ray instance on 127.0.0.1, two engine replicas.

Requests spread over the replicas, a conversation sticks to one, survives
the death of that replica through the shared state folder, autoscaling stays
within its bounds, and stopping the server leaves no Ray process behind.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from dijiang_deploy.export import ExportOptions, export_model
from dijiang_deploy.testing import random_model
from _ray_server import RayServer
from _server import ServerProcess
from _support import requires_smollm2

ray = pytest.importorskip("ray")
pytestmark = requires_smollm2


@pytest.fixture(scope="module")
def export(smollm2_dir, module_tmp) -> Path:
    folder = module_tmp("ray") / "tiny-smol"
    export_model(random_model("llama", seed=0, vocab_size=49152, eos_token_id=2), folder, ExportOptions(max_chunk=16),
                 tokenizer_dir=smollm2_dir)
    return folder


@pytest.fixture(scope="module")
def cluster(export, module_tmp):
    shared = module_tmp("shared-states")
    srv = RayServer(export, "--replicas", "2", "--replica-cpus", "0.5", "--max-batch", "8", "--state-dir", str(shared))
    srv.start()
    srv.connect()
    try:
        yield srv
    finally:
        ray.shutdown()
        code = srv.stop()
        left = srv.leftovers()
        shutil.rmtree(srv.temp, ignore_errors=True)
        assert code == 0, srv.output()[-3000:]
        assert not left, f"Ray processes left behind: {left}"


def _chat(url: str, messages: list[dict], n: int = 8, headers: dict | None = None) -> httpx.Response:
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny-smol", "messages": messages, "max_tokens": n,
                                                        "temperature": 0}, headers=headers or {}, timeout=120)
    assert r.status_code == 200, r.text
    return r


def test_concurrent_requests_spread_over_both_replicas(cluster):
    served = []

    def run(i: int) -> None:
        r = _chat(cluster.url, [{"role": "user", "content": f"Question number {i}?"}], 4, {"x-session-id": f"s{i}"})
        served.append(r.headers["x-dijiang-replica"])

    for start in (0, 8):  # two rounds of 8 concurrent requests, 16 session keys in all
        threads = [threading.Thread(target=run, args=(i,)) for i in range(start, start + 8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(served) == 16 and len(set(served)) == 2, served


def _converse(url: str, turns: list[str], history: list[dict] | None = None):
    history = list(history or [])
    replies = []
    for turn in turns:
        history.append({"role": "user", "content": turn})
        r = _chat(url, history)
        body = r.json()
        history.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        replies.append((r.headers["x-dijiang-replica"], body["usage"]["prompt_tokens_details"]["cached_tokens"],
                        body["choices"][0]["message"]["content"]))
    return history, replies


def test_a_conversation_sticks_to_its_replica_and_survives_its_death(cluster, export):
    turns = ["Hello, who are you?", "Tell me a story.", "Why?", "And then?"]
    history, replies = _converse(cluster.url, turns[:3])
    owners = {rep for rep, _, _ in replies}
    assert len(owners) == 1, replies
    assert all(cached > 0 for _, cached, _ in replies[1:]), replies
    owner = owners.pop()
    # Kill the replica that holds the conversation (Ray Serve names replica actors
    # SERVE_REPLICA::<app>#<deployment>#<replica id>).
    actor = ray.get_actor(f"SERVE_REPLICA::dijiang#engine#{owner}", namespace="serve")
    t0 = time.time()
    ray.kill(actor, no_restart=True)
    _, after = _converse(cluster.url, turns[3:], history)
    failover_s = time.time() - t0
    replica, cached, text = after[0]
    assert replica != owner
    assert cached > len(history) // 2, "resumed from the snapshot in the shared folder, not from scratch"
    # Token for token what one server gives the same conversation.
    with ServerProcess(export, "--state-cache-mib", "0") as single:
        _, solo = _converse(single.url, turns[3:], history)
    assert text == solo[0][2]
    print(f"failover: next answer {failover_s:.1f} s after the kill, {cached} tokens resumed")


def test_the_shipped_ray_serve_config_builds_the_application(tmp_path):
    import yaml
    from ray.serve import Application

    from dijiang_deploy.serving import ray_app

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "ray_serve.yaml").read_text())
    (entry,) = config["applications"]
    module, _, attr = entry["import_path"].partition(":")
    assert module == ray_app.__name__ and getattr(ray_app, attr) is ray_app.build
    app = ray_app.build({**entry["args"], "export_dir": str(tmp_path)})
    assert isinstance(app, Application)

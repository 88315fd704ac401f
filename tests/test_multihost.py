"""Multi-host: two jax.distributed processes on localhost (CPU, 4 devices each, gloo collectives)
serve one tp=8 model and produce the tokens of the single-device engine.

The processes are subprocesses started by this file (`python tests/test_multihost.py worker ...`),
since jax in the pytest process is already initialised with one device and no coordinator.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MAX_TOKENS = 8


def _prompts() -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(1)
    return [rng.integers(3, 200, int(rng.integers(1, 40))).tolist() for _ in range(5)]


ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
              kv_cache_memory_bytes=1 << 20, use_tqdm_on_load=False, token_buckets=(64,),
              skip_tokenizer_init=True, compilation_cache_dir="")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, ckpt: str, out: str, die: bool = False) -> None:
    os.environ["JAXENGINE_COORDINATOR_ADDRESS"] = f"127.0.0.1:{port}"
    os.environ["JAXENGINE_NUM_PROCESSES"] = "2"
    os.environ["JAXENGINE_PROCESS_ID"] = str(rank)
    from jaxengine import LLM, SamplingParams

    if die and rank == 1:  # the failure test: the worker vanishes while the driver keeps stepping
        import threading
        threading.Timer(6.0, lambda: os._exit(9)).start()
    # on rank 1: serves rank 0's steps, then returns; decode steps are multi-step (OP_MULTI_STEP)
    # where they qualify, the rest single steps (OP_STEP)
    llm = LLM(ckpt, tensor_parallel_size=8, num_scheduler_steps=3, **ENGINE)
    if die:
        while True:
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4), use_tqdm=False)
    import jax

    info = {"rank": rank, "process_count": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count()}
    if llm.is_driver:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
        info["tokens"] = [o.outputs[0].token_ids for o in outs]
        info["steps"] = llm.engine.num_steps
        llm.shutdown()
    with open(out, "w") as f:
        json.dump(info, f)


@pytest.fixture(scope="module")
def tiny_tp8_ckpt(tmp_path_factory) -> str:
    import tiny_checkpoints as tc

    tc.CONFIGS.setdefault("tp8_gqa", tc._llama_base(num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    return tc.make_checkpoint(str(tmp_path_factory.mktemp("tp8")), "tp8_gqa")


def _launch(ckpt: str, tmp_path, mode: str = "worker", extra_env: dict | None = None,
            timeout_s: float = 150) -> tuple[list[subprocess.Popen], list[str], list[str]]:
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}
    procs, outs = [], []
    for rank in range(2):
        out = str(tmp_path / f"rank{rank}.json")
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, __file__, mode, str(rank), str(port), ckpt, out],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    deadline = time.time() + timeout_s
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(deadline - time.time(), 1))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-host run hung:\n" + "\n".join(logs))
    return procs, outs, logs


def test_two_processes_with_four_devices_each_give_the_single_device_tokens(tiny_tp8_ckpt, tmp_path):
    procs, outs, logs = _launch(tiny_tp8_ckpt, tmp_path)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    info = [json.load(open(o)) for o in outs]
    assert [i["process_count"] for i in info] == [2, 2]
    assert [i["devices"] for i in info] == [8, 8] and [i["local_devices"] for i in info] == [4, 4]

    from jaxengine import LLM, SamplingParams
    ref = LLM(tiny_tp8_ckpt, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in
                ref.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)]
    assert info[0]["tokens"] == expected
    assert info[0]["steps"] < ref.engine.num_steps  # multi-step decoding did run across the hosts


def test_a_dead_worker_stops_the_driver_with_a_message_instead_of_a_hang(tiny_tp8_ckpt, tmp_path):
    procs, _, logs = _launch(tiny_tp8_ckpt, tmp_path, mode="die", timeout_s=120,
                             extra_env={"JAXENGINE_HEARTBEAT_TIMEOUT_S": "5"})
    assert procs[1].returncode == 9
    assert procs[0].returncode != 0
    assert "stopped sending heartbeats" in logs[0], logs[0][-3000:]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] in ("worker", "die"):
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], die=sys.argv[1] == "die")

"""Sharding over a device mesh: tensor and data parallelism give the unsharded engine's tokens, params
and KV pages sit where the rules say, the compiled step has exactly the collectives Megatron's layout
needs, and an orbax conversion round-trips.

The multi-device checks need 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8),
which must be set before jax starts; the pytest process may already run jax with one device.  So one
subprocess (`python tests/test_sharding.py worker OUT`) runs every multi-device engine once and
writes what it saw to JSON; the tests below read it.  Cheap single-process checks run in place.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TP_DP = [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (1, 2)]
# family -> tp sizes checked against tp=1 (besides the full TP_DP grid on "tp8_gqa")
OTHER_FAMILIES = {"qwen2": [4], "qwen3": [2], "mqa": [4]}
HLO_TOKENS, HLO_SEQS = 24, 8  # 24: no weight of the tiny model has a dimension of 24
MAX_TOKENS = 8

ENGINE = dict(dtype="float32", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64,
              kv_cache_memory_bytes=1 << 20, use_tqdm_on_load=False, token_buckets=(64,),
              skip_tokenizer_init=True)


def _register_families(tc) -> None:
    # 8 query heads so that tp=8 splits heads; 2 kv heads so that tp=4, 8 duplicate them.
    tc.CONFIGS.setdefault("tp8_gqa", tc._llama_base(num_attention_heads=8, num_key_value_heads=2, head_dim=8))


def _prompts() -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [{"prompt_token_ids": rng.integers(3, 200, int(rng.integers(1, 50))).tolist()} for _ in range(6)]


# ------------------------------------------------------------------------------------ worker
def _collectives(hlo: str) -> list[tuple[str, list[int]]]:
    """(op, shape) of every all-reduce / all-gather / reduce-scatter / all-to-all in compiled HLO."""
    found = []
    for line in hlo.splitlines():
        m = re.search(r"= (\(.*?\)|\w+\[[\d,]*\]\S*) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                      r"collective-permute)(-start)?\(", line)
        if m:
            for shape in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
                found.append((m.group(2), [int(d) for d in shape.split(",") if d]))
    return found


def _worker(out_path: str, tmp: str) -> None:
    import time

    import jax
    import numpy as np

    sys.path.insert(0, HERE)
    import tiny_checkpoints as tc

    from jaxengine import LLM, SamplingParams, sharding
    from jaxengine.entrypoints.convert import convert
    from jaxengine.loader.checkpoint import iter_safetensors

    _register_families(tc)
    t_start = time.time()
    engine = {**ENGINE, "compilation_cache_dir": os.path.join(tmp, "xla")}
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = _prompts()
    res: dict = {"devices": jax.device_count(), "tokens": {}}
    ckpts = {f: tc.make_checkpoint(os.path.join(tmp, f), f, with_tokenizer=(f == "tp8_gqa"))
             for f in ["tp8_gqa", *OTHER_FAMILIES]}

    def run(family, tp, dp, model=None, k=1, layout=None, decode_program=False, residual_norm=None):
        llm = LLM(model or ckpts[family], tensor_parallel_size=tp, data_parallel_size=dp, **engine,
                  num_scheduler_steps=k, param_layout=layout, decode_program=decode_program,
                  residual_norm=residual_norm)
        steps = llm.engine.num_steps
        toks = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        key = (f"{family}/tp{tp}dp{dp}" + ("/orbax" if model else "") + (f"/k{k}" if k > 1 else "")
               + (f"/{layout}" if layout else "") + ("/decode_program" if decode_program else "")
               + (f"/residual_norm_{residual_norm}" if residual_norm else ""))
        res["tokens"][key] = toks
        res.setdefault("steps", {})[key] = llm.engine.num_steps - steps
        return llm

    for tp, dp in TP_DP:
        llm = run("tp8_gqa", tp, dp)
        if (tp, dp) == (1, 2):  # requests were spread over both replicas
            res["dp_steps"] = [c.num_steps for c in llm.engine.cores]
        if (tp, dp) == (4, 1):
            tp4 = llm
    for family, tps in OTHER_FAMILIES.items():
        for tp in [1, *tps]:
            run(family, tp, 1)
    run("tp8_gqa", 4, 1, k=4)  # multi-step decoding, sharded (decode attention on the fused q/k/v)
    qk_norm_family = next(f for f in OTHER_FAMILIES if "qwen3" in f)
    run(qk_norm_family, OTHER_FAMILIES[qk_norm_family][-1], 1, decode_program=True)  # separate q/k/v
    run("tp8_gqa", 2, 1, residual_norm="gpu")  # the residual-norm kernel (interpret) in a shard_map
    hf4 = run("tp8_gqa", 4, 1, layout="hf")  # the checkpoint's own layout, sharded
    res["hf_layout_names"] = sorted(sharding.flatten(hf4.runner.params))

    # Where every param and KV page lives at tp=4 (2 kv heads duplicated to 4).
    specs = {}
    for name, a in sharding.flatten(tp4.runner.params).items():
        specs[name] = {"spec": [ax for ax in a.sharding.spec], "shape": list(a.shape),
                       "shard_shape": list(a.addressable_shards[0].data.shape)}
    res["specs"] = specs
    kv = tp4.runner.kv_caches[0]
    res["kv"] = {"spec": list(kv.sharding.spec), "shape": list(kv.shape),
                 "shard_shape": list(kv.addressable_shards[0].data.shape)}
    # The fused layout: device i's qkv_proj shard [1 kv head, 2 q heads + k + v, head_dim, hidden]
    weights = dict(iter_safetensors(ckpts["tp8_gqa"]))
    q_heads, k_heads, v_heads = (weights[f"model.layers.0.self_attn.{n}_proj.weight"].reshape(-1, 8, 64)
                                 for n in "qkv")
    qkv = tp4.runner.params["model"]["layers"]["0"]["self_attn"]["qkv_proj"]["weight"]
    shards = [np.asarray(s.data) for s in sorted(qkv.addressable_shards, key=lambda s: s.index[0].start)]
    res["kv_head_of_shard"] = [next(h for h in range(2) if np.array_equal(sh[0, 2], k_heads[h])) for sh in shards]
    res["v_head_of_shard"] = [next(h for h in range(2) if np.array_equal(sh[0, 3], v_heads[h])) for sh in shards]
    res["q_heads_of_shard"] = [[next(h for h in range(8) if np.array_equal(sh[0, j], q_heads[h])) for j in range(2)]
                               for sh in shards]

    # Bigger buckets compiled in the background over a mesh (tp 2 x dp 2: two runners, each its
    # own thread), the warm-up's on a pool of 2 threads: the steps run what the threads compiled,
    # and the tokens are tp=1's.
    bg = LLM(ckpts["tp8_gqa"], tensor_parallel_size=2, data_parallel_size=2,
             **{**engine, "token_buckets": (8, 16, 32), "background_compile_above": 16, "compile_threads": 2})
    from jaxengine.runner.compile_watch import num_background_compilations
    res["background"] = {"done": bg.wait_for_compilation(timeout=300),
                         "background_programs": num_background_compilations(),
                         "budgets": [r.token_budget for r in bg.runners],
                         "precompiled": [r.precompile_s > 0 for r in bg.runners],
                         "errors": [repr(r.background_compile_error) for r in bg.runners if r.background_compile_error]}
    res["tokens"]["tp8_gqa/tp2dp2/background"] = [
        o.outputs[0].token_ids for o in bg.generate(prompts, greedy, use_tqdm=False)]
    res["background"]["compiled_since_warmup"] = bg.num_compilations_since_warmup()

    # Collectives of the compiled step, tp=2 and tp=4.
    res["hlo"] = {}
    for tp in (2, 4):
        llm = LLM(ckpts["tp8_gqa"], tensor_parallel_size=tp, **{**engine, "warmup": False,
                                                                "max_num_batched_tokens": HLO_TOKENS,
                                                                "token_buckets": (HLO_TOKENS,)})
        r = llm.runner
        t, s = HLO_TOKENS, r.seqs_for(HLO_TOKENS)
        batch, samp = r._empty_arrays(t, s)
        ints, floats = r._put_inputs(*r._pack(batch, samp, r._layout(t, s)))
        hlo = r._forward.lower(r.params, r.kv_caches, r.penalty_state["last_tokens"], ints, floats,
                               (t, s)).compile().as_text()
        res["hlo"][str(tp)] = {"seqs": s, "collectives": _collectives(hlo)}

    # Orbax: convert on a tp=2 mesh, restore into tp=4 and into one device.
    orbax_dir = os.path.join(tmp, "tp8_orbax")
    convert(ckpts["tp8_gqa"], orbax_dir, tensor_parallel_size=2)
    res["orbax_files"] = sorted(os.listdir(orbax_dir))
    restored = run("tp8_gqa", 4, 1, model=orbax_dir)
    run("tp8_gqa", 1, 1, model=orbax_dir)
    a, b = sharding.flatten(tp4.runner.params), sharding.flatten(restored.runner.params)
    res["orbax_params_equal"] = sorted(a) == sorted(b) and all(
        a[n].sharding == b[n].sharding and a[n].dtype == b[n].dtype
        and np.array_equal(np.asarray(a[n]), np.asarray(b[n])) for n in a)

    # Impossible layouts fail with a message naming the problem.
    errors = {}
    for key, fn in {"too_many": lambda: sharding.make_mesh(16),
                    "heads": lambda: LLM(ckpts["tp8_gqa"], tensor_parallel_size=3, **engine)}.items():
        try:
            fn()
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)
    res["errors"] = errors
    res["worker_s"] = time.time() - t_start
    with open(out_path, "w") as f:
        json.dump(res, f)


# ------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sharding")
    out = tmp / "seen.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, "worker", str(out), str(tmp)], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return json.loads(out.read_text())


def test_worker_sees_eight_devices(seen):
    assert seen["devices"] == 8


@pytest.mark.parametrize("tp,dp", [c for c in TP_DP if c != (1, 1)])
def test_greedy_tokens_with_tensor_and_data_parallelism_match_one_device(seen, tp, dp):
    ref = seen["tokens"]["tp8_gqa/tp1dp1"]
    assert len(ref) == 6 and all(len(t) == MAX_TOKENS for t in ref)
    assert seen["tokens"][f"tp8_gqa/tp{tp}dp{dp}"] == ref


def test_background_compiled_buckets_under_tensor_and_data_parallelism(seen):
    bg = seen["background"]
    assert bg["done"] and bg["budgets"] == [64, 64] and bg["background_programs"] >= 4, bg
    assert bg["precompiled"] == [True, True], bg
    assert bg["errors"] == [] and bg["compiled_since_warmup"] == 0, bg
    assert seen["tokens"]["tp8_gqa/tp2dp2/background"] == seen["tokens"]["tp8_gqa/tp1dp1"]


def test_multi_step_decoding_under_tensor_parallelism_matches_one_device(seen):
    assert seen["tokens"]["tp8_gqa/tp4dp1/k4"] == seen["tokens"]["tp8_gqa/tp1dp1"]
    assert seen["steps"]["tp8_gqa/tp4dp1/k4"] < seen["steps"]["tp8_gqa/tp4dp1"]


def test_decode_program_under_tensor_parallelism_matches_one_device(seen):
    """K = 1 decode programs of a qk-norm model (q and k normed, so the decode attention gets them
    separately) sharded over tp: the same greedy tokens as one device."""
    [key] = [k for k in seen["tokens"] if k.endswith("/decode_program")]
    assert seen["tokens"][key] == seen["tokens"][key.split("/")[0] + "/tp1dp1"]


def test_residual_norm_kernel_under_tensor_parallelism_matches_one_device(seen):
    """The residual-add + RMSNorm Pallas kernel (interpret mode) inside a replicated shard_map at
    tp = 2, every program of the step: the same greedy tokens as one device without it."""
    assert seen["tokens"]["tp8_gqa/tp2dp1/residual_norm_gpu"] == seen["tokens"]["tp8_gqa/tp1dp1"]


@pytest.mark.parametrize("family,tp", [(f, tp) for f, tps in OTHER_FAMILIES.items() for tp in tps])
def test_greedy_tokens_match_for_bias_tied_qk_norm_and_mqa_models(seen, family, tp):
    assert seen["tokens"][f"{family}/tp{tp}dp1"] == seen["tokens"][f"{family}/tp1dp1"]


def test_data_parallel_requests_are_spread_over_replicas(seen):
    assert all(n > 0 for n in seen["dp_steps"])


def _expected_spec(name: str) -> list:
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return ["tp", None]
    if name.endswith("qkv_proj.weight"):  # [kv heads, group + 2, head_dim, hidden]
        return ["tp", None, None, None]
    if name.endswith("gate_up_proj.weight"):  # [2, intermediate, hidden]
        return [None, "tp", None]
    if re.search(r"(q|k|v|gate|up)_proj\.weight$", name):
        return ["tp", None]
    if re.search(r"(q|k|v)_proj\.bias$", name):
        return ["tp"]
    if re.search(r"(o|down)_proj\.weight$", name):
        return [None, "tp"]
    assert name.endswith("norm.weight"), name
    return []


def test_every_param_is_sharded_as_the_rules_say(seen):
    specs = seen["specs"]
    assert len(specs) == 15  # 2 layers x 6 (fused layout) + embed, final norm, lm_head
    for name, s in specs.items():
        assert s["spec"] == _expected_spec(name), name
        split = [d // 4 if ax == "tp" else d for d, ax in zip(s["shape"], s["spec"] + [None] * 4)]
        assert s["shard_shape"] == split, name
    # 2 kv heads of head_dim 8 duplicated to 4: one kv head (with its 2 q heads, k and v) per device
    assert specs["model.layers.0.self_attn.qkv_proj.weight"]["shape"] == [4, 4, 8, 64]
    assert specs["model.layers.0.self_attn.qkv_proj.weight"]["shard_shape"] == [1, 4, 8, 64]
    assert specs["model.layers.0.mlp.gate_up_proj.weight"]["shard_shape"][:2] == [2, 32]
    # the checkpoint's layout stays selectable (param_layout="hf") and gives the same tokens
    assert "model.layers.0.self_attn.k_proj.weight" in seen["hf_layout_names"]
    assert seen["tokens"]["tp8_gqa/tp4dp1/hf"] == seen["tokens"]["tp8_gqa/tp1dp1"]


def test_kv_heads_are_duplicated_so_each_device_holds_the_head_of_its_q_heads(seen):
    # tp=4, 8 q heads, 2 kv heads: device i holds q heads 2i, 2i+1, whose kv head is i // 2
    assert seen["kv_head_of_shard"] == [0, 0, 1, 1]
    assert seen["v_head_of_shard"] == [0, 0, 1, 1]
    assert seen["q_heads_of_shard"] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_kv_pages_are_split_by_kv_head_keeping_k_and_v_together(seen):
    kv = seen["kv"]
    assert kv["spec"] == [None, None, "tp", None]
    assert kv["shape"][2:] == [2 * 4, 8]  # combined axis: K/V of 4 (duplicated) kv heads
    assert kv["shard_shape"][2:] == [2, 8]  # one head's K and V per device


@pytest.mark.parametrize("tp", [2, 4])
def test_compiled_step_has_two_all_reduces_per_layer_and_no_weight_gathers(seen, tp):
    hlo = seen["hlo"][str(tp)]
    seqs, layers, hidden, vocab = hlo["seqs"], 2, 64, 256
    ops = hlo["collectives"]
    activation = [op for op, shape in ops if op == "all-reduce" and shape == [HLO_TOKENS, hidden]]
    # o_proj + down_proj per layer, and one for the vocab-parallel embedding lookup
    assert len(activation) == 2 * layers + 1, ops
    # and one all-gather of the vocab-parallel logits for the sampler; nothing else (no weight moves)
    assert sorted(map(tuple, (s for _, s in ops))) == [(seqs, vocab)] + [(HLO_TOKENS, hidden)] * 5, ops
    assert [op for op, s in ops if s == [seqs, vocab]] == ["all-gather"]


def test_orbax_convert_and_restore_round_trip(seen):
    assert {"jaxengine_orbax.json", "params", "config.json", "generation_config.json",
            "tokenizer.json"} <= set(seen["orbax_files"])
    assert not any(f.endswith(".safetensors") for f in seen["orbax_files"])
    assert seen["orbax_params_equal"]
    ref = seen["tokens"]["tp8_gqa/tp1dp1"]
    assert seen["tokens"]["tp8_gqa/tp4dp1/orbax"] == ref
    assert seen["tokens"]["tp8_gqa/tp1dp1/orbax"] == ref


def test_impossible_layouts_raise_clear_errors(seen):
    assert "16 devices asked for, but only 8" in seen["errors"]["too_many"]
    assert "num_attention_heads (8) must be divisible by tensor_parallel_size (3)" in seen["errors"]["heads"]


# ------------------------------------------------------------------- single-process checks
def test_partition_rules_by_name():
    from jax.sharding import PartitionSpec as P

    from jaxengine.sharding import partition_spec

    assert partition_spec("model.layers.7.self_attn.q_proj.weight") == P("tp", None)
    assert partition_spec("model.layers.7.self_attn.v_proj.bias") == P("tp")
    assert partition_spec("model.layers.7.mlp.down_proj.weight") == P(None, "tp")
    assert partition_spec("model.layers.7.self_attn.q_norm.weight") == P()
    assert partition_spec("model.norm.weight") == P()
    assert partition_spec("lm_head.weight") == P("tp", None)
    # a vocab tp does not divide: replicated rather than refused
    assert partition_spec("model.embed_tokens.weight", (32001, 64), 4) == P()
    # the fused layout's tensors split by kv head / intermediate column
    assert partition_spec("model.layers.7.self_attn.qkv_proj.weight") == P("tp", None, None, None)
    assert partition_spec("model.layers.7.self_attn.qkv_proj.bias") == P("tp", None, None)
    assert partition_spec("model.layers.7.mlp.gate_up_proj.weight") == P(None, "tp", None)


def test_layout_conversion_drops_each_old_layer_as_it_goes():
    """map_layers converts in place: no old layer outlives its replacement (peak memory = one
    layer more, not the model twice), and the new q/k/v tensor holds the checkpoint's heads."""
    import gc
    import weakref

    import jax
    import numpy as np
    import tiny_checkpoints as tc

    from jaxengine.config import ModelConfig
    from jaxengine.models import llama
    from jaxengine.sharding import map_layers

    cfg = ModelConfig.from_hf_config(tc.hf_config("qwen2"), dtype="float32")  # q/k/v biases too
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    layer0 = params["model"]["layers"]["0"]
    q = np.array(layer0["self_attn"]["q_proj"]["weight"])  # copies (np.asarray may view the buffer)
    k_bias = np.array(layer0["self_attn"]["k_proj"]["bias"])
    old = [weakref.ref(a) for layer in params["model"]["layers"].values() for a in jax.tree.leaves(layer)]
    del layer0
    out = map_layers(params, lambda layer: llama.fuse_layer_weights(layer, cfg))
    jax.block_until_ready(out)  # a running conversion still holds its inputs
    gc.collect()
    assert out is params and llama.layout_of(params) == "fused"
    # every array of the old layers is gone (the jitted conversion re-emits norms and o/down too)
    assert [r() for r in old if r() is not None] == []
    n, g, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    qkv = params["model"]["layers"]["0"]["self_attn"]["qkv_proj"]
    assert qkv["weight"].shape == (n, g + 2, d, cfg.hidden_size)
    np.testing.assert_array_equal(np.asarray(qkv["weight"][:, :g]).reshape(n * g * d, -1), q)
    np.testing.assert_array_equal(np.asarray(qkv["bias"][:, g]).reshape(-1), k_bias)


def test_model_checks_name_the_field():
    import tiny_checkpoints as tc

    from jaxengine.config import ModelConfig
    from jaxengine.sharding import check_model, kv_replicas

    llama3 = ModelConfig.from_hf_config(tc.hf_config("llama3"))  # 4 q heads, 2 kv heads
    check_model(llama3, 4)
    assert kv_replicas(llama3, 4) == 2 and kv_replicas(llama3, 2) == 1
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by tensor_parallel_size \(8\)"):
        check_model(llama3, 8)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        check_model(ModelConfig.from_hf_config(tc._llama_base(num_attention_heads=6, num_key_value_heads=3,
                                                                head_dim=8)), 2)


def test_mesh_asking_more_devices_than_exist_fails():
    import jax

    from jaxengine.sharding import make_mesh

    n = jax.device_count()
    with pytest.raises(ValueError, match=f"{2 * n} devices asked for, but only {n}"):
        make_mesh(2 * n)
    with pytest.raises(ValueError, match="must equal the number of devices given"):
        make_mesh(2, 1, devices=jax.devices()[:1])


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _worker(sys.argv[2], sys.argv[3])

"""Llama and Qwen2 against transformers on random-weight fixtures (tools/make_llama_reference.py, under both many-row
matmul backends), their kernels against NumPy references, and the radial machinery (oracle, unified cache) on a
grouped-query model."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import radial_min
from radial_min import kernels
from radial_min.analysis import oracle
from radial_min.blocks import Rows
from radial_min.cache import KVCache
from radial_min.radial import RadialNetwork
from radial_min.router import InOrder, Scripted
from radial_min.models import parse_config
from radial_min.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA_FIXTURES = ["llama-gqa-tied", "llama-mha-untied-bf16", "qwen2-bias"]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", LLAMA_FIXTURES)
def test_llama_logits_and_greedy_tokens(name, matmul_backend):
    model = radial_min.load(FIXTURES / name)
    ref = np.load(FIXTURES / name / "reference.npz")
    logits = model.forward(ref["input_ids"])
    assert logits.dtype == np.float32 and logits.shape == ref["logits"].shape
    assert rel_err(logits, ref["logits"]) <= 1e-4
    np.testing.assert_array_equal(radial_min.generate(model, ref["input_ids"], 20, stop_at_eos=False), ref["greedy"])


def test_fixtures_cover_the_variants():
    m = {n: radial_min.load(FIXTURES / n) for n in LLAMA_FIXTURES}
    gqa, mha, qwen = (m[n] for n in LLAMA_FIXTURES)
    assert (
        gqa.config.num_key_value_heads < gqa.config.num_attention_heads
        and gqa.lm_head.weight is gqa.embed_tokens.weight
    )
    assert gqa.config.rope_theta == 500.0 and mha.config.rope_theta == 10000.0 and qwen.config.rope_theta == 1e6
    assert mha.lm_head.weight is not mha.embed_tokens.weight and set(mha.dtypes_on_disk) == {"bfloat16"}
    assert qwen.blocks[0].qkv.bias is not None and qwen.blocks[0].out.bias is None and gqa.blocks[0].qkv.bias is None
    assert gqa.new_cache().n_kv_head == 2 and qwen.new_cache().n_kv_head == 1


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-bias"])
def test_kv_cache_decode_equals_full_forward(name):
    model = radial_min.load(FIXTURES / name)
    ids = np.load(FIXTURES / name / "reference.npz")["input_ids"]
    full = model.forward(ids)
    cache = model.new_cache()
    parts = [model.forward(ids[:4], cache)] + [model.forward(ids[t : t + 1], cache) for t in range(4, len(ids))]
    assert rel_err(np.concatenate(parts), full) <= 1e-5


def test_oracle_keep_all_equals_forward_with_both_kv_rules():
    """The oracle's per-token walk (including its token-by-token `drop` attention) rotates and groups as forward."""
    model = radial_min.load(FIXTURES / "qwen2-bias")
    ids = np.load(FIXTURES / "qwen2-bias" / "reference.npz")["input_ids"]
    full = model.forward(ids)
    for rule in ("fill", "drop"):
        logits, keep, _ = oracle.run_sequence(model, ids, lambda b, rows, r: np.ones(len(rows), bool), kv_rule=rule)
        assert keep.all() and rel_err(logits, full) <= 1e-5


@pytest.mark.parametrize("policy", ["per-layer", "global"])
def test_unified_cache_with_grouped_query_attention(policy):
    """Every token through every block over the unified cache: per-layer is the sequential model exactly; global
    runs (its step encoding is sized for Hkv key heads and repeated across each group of query heads)."""
    model = radial_min.load(FIXTURES / "llama-gqa-tied")
    ids = np.load(FIXTURES / "llama-gqa-tied" / "reference.npz")["input_ids"]
    net = RadialNetwork(model, InOrder(len(model.blocks)), cache_policy=policy)
    cache = net.new_cache()
    rows = [net.forward(ids[t : t + 1], cache) for t in range(len(ids))]  # token by token
    out = np.concatenate(rows)
    assert len(cache) == len(ids) * model.n_layer
    err = rel_err(out, model.forward(ids))
    assert err <= 1e-5 if policy == "per-layer" else 1e-3 < err


def test_global_step_encoding_follows_the_query_heads_key_head():
    """Under grouped-query attention (4 query heads, 2 key/value heads of 8 dims) the global policy adds the step code
    of key/value head g to its keys and to every query head h with h // 2 == g, so q.k gains PE.PE within a group."""
    from radial_min.cache import step_encoding

    cache = KVCache("global", 2, 8)
    q, k, v = np.zeros((1, 32), np.float32), np.zeros((1, 16), np.float32), np.zeros((1, 16), np.float32)
    q_out, store, _, _ = cache.write(0, q, k, v, Rows(np.array([0]), cache, 3))
    enc = step_encoding(3, 16).reshape(2, 8)  # [Hkv, D]
    np.testing.assert_array_equal(q_out.reshape(4, 8), enc[[0, 0, 1, 1]])
    np.testing.assert_array_equal(store.k[0, :, 0], enc)  # head-major storage: [B, Hkv, entries, D]


def test_rmsnorm_kernel_matches_reference():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, 48)) * 3).astype(np.float32)
    w = rng.standard_normal(48).astype(np.float32)
    np.testing.assert_allclose(kernels.rmsnorm(x, w, 1e-6), kernels.rmsnorm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-5)
    y = kernels.rmsnorm_ref(x, np.ones(48, np.float32), 0.0)
    np.testing.assert_allclose(np.sqrt((y.astype(np.float64) ** 2).mean(-1)), 1.0, rtol=1e-6)


def test_rope_kernel_matches_reference_and_is_a_rotation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3 * 8)).astype(np.float32)
    pos = np.array([0, 1, 2, 7, 100])
    cos, sin = kernels.rope_angles(pos, 8, 10000.0)
    y = kernels.rope(x, 3, cos, sin)
    np.testing.assert_allclose(y, kernels.rope_ref(x, 3, cos, sin), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[0], x[0], rtol=1e-6)  # position 0: identity
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)  # norms kept
    # relative: q.k depends only on the position difference
    q, k = x[:1, :8], x[1:2, :8]

    def rotated(row, at):
        return kernels.rope(row, 1, *kernels.rope_angles([at], 8, 1e4))[0]

    dots = [float(rotated(q, a + 3) @ rotated(k, a)) for a in (0, 50)]
    assert abs(dots[0] - dots[1]) < 1e-4


def test_silu_kernel_matches_reference():
    x = np.linspace(-20, 20, 401, dtype=np.float32).reshape(1, -1)
    np.testing.assert_allclose(kernels.activation("silu", x.copy()), kernels.silu_ref(x), rtol=1e-5, atol=1e-6)


def test_grouped_query_attention_kernel_matches_reference():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((6, 4 * 8)).astype(np.float32)
    k, v = (rng.standard_normal((6, 2 * 8)).astype(np.float32) for _ in range(2))
    pos = np.arange(6)
    out = kernels.attention(q, k, v, 4, pos, pos, n_kv_head=2)
    np.testing.assert_allclose(out, kernels.attention_ref(q, k, v, 4, pos, pos, n_kv_head=2), rtol=1e-5, atol=1e-6)
    k_wide, v_wide = (np.repeat(t.reshape(6, 2, 8), 2, 1).reshape(6, 32) for t in (k, v))
    wide = kernels.attention(q, k_wide, v_wide, 4, pos, pos)
    np.testing.assert_allclose(out, wide, rtol=1e-5, atol=1e-6)  # = multi-head attention with each kv head repeated


BASE = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.mark.parametrize(
    "change,match",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling of type 'llama3' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn"}}, "rope_parameters of type 'yarn'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_theta": -1.0}, "rope_theta must be a positive number"),
        ({"rms_norm_eps": "small"}, "rms_norm_eps must be a positive number"),
        ({"hidden_size": 16.5}, "hidden_size must be a positive integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"eos_token_id": 64}, r"eos_token_id must be a token id in \[0, 64\)"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"head_dim": 5}, "head_dim 5 must be even"),
    ],
)
def test_bad_llama_configs_are_refused_by_field(change, match):
    with pytest.raises(CheckpointError, match=match):
        parse_config({**BASE, **change}, "cfg.json")


def test_config_accepts_both_dtype_spellings_and_rope_forms():
    a = parse_config({**BASE, "torch_dtype": "bfloat16", "rope_theta": 5.0, "rope_scaling": None})
    b = parse_config({**BASE, "dtype": "bfloat16", "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}})
    assert a == b and a.dtype == "bfloat16" and a.rope_theta == 5.0 and a.head_dim == 4


def test_missing_qwen2_bias_is_reported(tmp_path):
    from radial_min.io.checkpoint import SafetensorsFile, write_safetensors

    dst = tmp_path / "q"
    shutil.copytree(FIXTURES / "qwen2-bias", dst)
    f = SafetensorsFile(dst / "model.safetensors")
    t = {n: f.read(n) for n in f.entries if n != "model.layers.1.self_attn.k_proj.bias"}
    write_safetensors(dst / "model.safetensors", t)
    with pytest.raises(CheckpointError, match=r"missing: layers\.1\.self_attn\.k_proj\.bias"):
        radial_min.load(dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-bias"])
def test_routed_execution_with_skips_equals_the_drop_oracle(name):
    """Random per-token skips on a grouped-query model: the radial engine (per-layer unified cache, keys stored after
    the rotation) and the oracle's block-by-block `drop` rule compute the same logits, so the drop rule's cost on a
    real model (docs/real-model.md) is the engine's, not a simulation's."""
    model = radial_min.load(FIXTURES / name)
    ids = np.load(FIXTURES / name / "reference.npz")["input_ids"]
    keep = np.random.default_rng(0).random((len(ids), len(model.blocks))) < 0.6
    keep[0, :] = False  # the first token skips everything: later tokens get no key of it in any layer
    logits, kept, _ = oracle.run_sequence(model, ids, oracle.forced(keep), "drop")
    np.testing.assert_array_equal(kept, keep)
    routes = [np.flatnonzero(row).tolist() for row in keep]
    radial = RadialNetwork(model, Scripted(routes, len(model.blocks)))
    assert rel_err(radial.forward(ids, radial.new_cache()), logits) <= 1e-5
    assert rel_err(logits, model.forward(ids)) > 1e-2  # the skips do change the logits

"""Parity with transformers on random-weight checkpoints of every supported layout (tools/make_reference.py).

The bar, as in minGPT's HF-import test: logits within 1e-4 * max|logit|, and the same greedy tokens; under both
many-row matmul backends (conftest's matmul_backend fixture).
"""
from pathlib import Path

import numpy as np
import pytest

import radial_min
from conftest import shared

FIXTURES = Path(__file__).parent / "fixtures"
OPT_FIXTURES = ["opt-pre", "opt-fp16-sharded", "opt-bf16-hub", "opt-350m-style", "opt-nobias-gelu", "opt-hub-bin"]
VIT_FIXTURES = ["vit-cls", "vit-model-bf16", "vit-model-nopool"]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", OPT_FIXTURES)
def test_opt_logits_and_greedy_tokens(name, matmul_backend):
    model = radial_min.load(FIXTURES / name)
    ref = np.load(FIXTURES / name / "reference.npz")
    logits = model.forward(ref["input_ids"])
    assert logits.dtype == np.float32 and logits.shape == ref["logits"].shape
    assert rel_err(logits, ref["logits"]) <= 1e-4
    greedy = radial_min.generate(model, ref["input_ids"], 20, stop_at_eos=False)
    np.testing.assert_array_equal(greedy, ref["greedy"])
    np.testing.assert_array_equal(radial_min.generate(model, ref["input_ids"], 20), ref["greedy_eos"])
    rep = radial_min.generate(model, ref["input_ids"], 20, stop_at_eos=False, repetition_penalty=1.3)
    np.testing.assert_array_equal(rep, ref["greedy_rep1.3"])  # transformers' repetition penalty, same rule
    assert not np.array_equal(rep, greedy) or len(set(greedy.tolist())) == 20


def test_fixtures_cover_the_variants():
    """The fixture set exercises what the loader claims to support (guards against a fixture silently changing)."""
    seen = {}
    for name in OPT_FIXTURES:
        m = radial_min.load(FIXTURES / name)
        seen[name] = (set(m.dtypes_on_disk), m.config.do_layer_norm_before, m.project_in is not None, m.config.enable_bias)
    assert seen["opt-fp16-sharded"][0] == {"float16"}
    assert len(list((FIXTURES / "opt-fp16-sharded").glob("model-*.safetensors"))) > 1
    assert seen["opt-bf16-hub"][0] == {"bfloat16"}
    assert seen["opt-350m-style"][1:3] == (False, True)
    assert seen["opt-nobias-gelu"][3] is False
    assert (FIXTURES / "opt-hub-bin" / "pytorch_model.bin").is_file()


@pytest.mark.parametrize("name", VIT_FIXTURES)
def test_vit_outputs(name, matmul_backend):
    model = radial_min.load(FIXTURES / name)
    ref = np.load(FIXTURES / name / "reference.npz")
    out = model.forward(ref["pixel_values"])
    assert out.shape == ref["output"].shape
    assert rel_err(out, ref["output"]) <= 1e-4


def test_vit_photo_preprocessing_matches_transformers():
    """Real photos through our resize/rescale/normalize equal ViTImageProcessor's pixel values (Pillow decodes)."""
    pytest.importorskip("PIL")
    from radial_min import images

    folder = FIXTURES / "vit-cls"
    ref = np.load(folder / "reference.npz")
    settings = images.read_preprocessor(folder, 32)
    for name, expected in zip(ref["photos"], ref["photo_pixels"]):
        path = shared("images", str(name))
        ours = images.preprocess(images.read_image(path), settings)
        np.testing.assert_allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["opt-pre", "opt-350m-style"])
def test_kv_cache_decode_equals_full_forward(name, matmul_backend):
    """Prefill a prefix, then feed the rest one token at a time: the same logits as one full pass."""
    model = radial_min.load(FIXTURES / name)
    ids = np.load(FIXTURES / name / "reference.npz")["input_ids"]
    full = model.forward(ids)
    cache = model.new_cache()
    parts = [model.forward(ids[:5], cache)] + [model.forward(ids[t : t + 1], cache) for t in range(5, len(ids))]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    assert cache.n_tokens == len(ids)
    assert all(r.n == len(ids) for r in cache.layers)


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 1.5e-2)])
@pytest.mark.parametrize("name", ["opt-pre", "opt-350m-style", "vit-cls"])
def test_half_precision_weights_in_memory(name, dtype, tol):
    """Weights kept in half precision (compute in float32): the parity error stays small and is reported."""
    model = radial_min.load(FIXTURES / name, weights_dtype=dtype)
    ref = np.load(FIXTURES / name / "reference.npz")
    out = model.forward(ref["input_ids"] if "opt" in name else ref["pixel_values"])
    err = rel_err(out, ref["logits"] if "opt" in name else ref["output"])
    assert 1e-6 < err <= tol  # really rounded, still close
    assert model.blocks[0].qkv.weight.dtype == (np.float16 if dtype == "float16" else np.uint16)
    if "opt" in name:  # decode runs the one-row half-precision kernel (matvec_half): same greedy tokens
        cache = model.new_cache()
        full = model.forward(ref["input_ids"])
        steps = np.concatenate([model.forward(ref["input_ids"][t : t + 1], cache) for t in range(len(ref["input_ids"]))])
        assert rel_err(steps, full) <= 1e-5
        np.testing.assert_array_equal(radial_min.generate(model, ref["input_ids"], 20, stop_at_eos=False), ref["greedy"])

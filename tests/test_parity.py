"""Parity with transformers on random-weight checkpoints of every supported layout (tools/make_reference.py).

The bar, as in minGPT's HF-import test: logits within 1e-4 * max|logit|, and the same greedy tokens; under both
many-row matmul backends (conftest's matmul_backend fixture).
"""

from pathlib import Path

import numpy as np
import pytest

import radial_min
from radial_min.dtypes import Int8Matrix, to_float32
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
        seen[name] = (
            set(m.dtypes_on_disk),
            m.config.do_layer_norm_before,
            m.project_in is not None,
            m.config.enable_bias,
        )
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
    from radial_min.io import images

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
    assert len(cache.parts) == model.n_layer and all(p.count[0] == len(ids) for p in cache.parts.values())


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
        ids = ref["input_ids"]
        full = model.forward(ids)
        steps = np.concatenate([model.forward(ids[t : t + 1], cache) for t in range(len(ids))])
        assert rel_err(steps, full) <= 1e-5
        np.testing.assert_array_equal(radial_min.generate(model, ids, 20, stop_at_eos=False), ref["greedy"])


def _dequantized(model):
    """The same model with every Int8Matrix replaced by its float32 values (the NumPy reference of int8)."""
    for m in model.modules():
        if isinstance(m.weight, Int8Matrix):
            m.weight = to_float32(m.weight)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


@pytest.mark.parametrize("name", ["opt-pre", "opt-350m-style", "opt-nobias-gelu", "llama-gqa-tied", "qwen2-bias"])
def test_int8_weights_in_memory(name, matmul_backend):
    """int8 weights (per-row scales, dequantized inside the kernels): the engine computes exactly what float32 math
    on the dequantized weights gives (1e-5: the kernels add nothing but float32 rounding); against the float32
    model the difference is the quantization itself, within 5e-2 of the largest logit on these 16-wide random
    fixtures (docs/performance.md); on the OPT fixtures the greedy tokens do not change, decode included."""
    model = radial_min.load(FIXTURES / name, weights_dtype="int8")
    ref = np.load(FIXTURES / name / "reference.npz")
    ids = ref["input_ids"]
    out = model.forward(ids)
    assert type(model.blocks[0].qkv.weight).__name__ == "Int8Matrix" and model.weights_dtype == "int8"
    assert 1e-3 < rel_err(out, ref["logits"]) <= 5e-2  # really quantized, still close
    cache = model.new_cache()
    steps = np.concatenate([model.forward(ids[t : t + 1], cache) for t in range(len(ids))])  # the one-row kernel
    assert rel_err(steps, out) <= 1e-5
    if "opt" in name:
        np.testing.assert_array_equal(radial_min.generate(model, ids, 20, stop_at_eos=False), ref["greedy"])
    assert rel_err(_dequantized(model).forward(ids), out) <= 1e-5


def test_int8_shipped_model_memory_and_text():
    """The shipped model in int8: weights take <= 0.3x their float32 bytes, and 60 greedy tokens are the
    float32 model's."""
    f32 = radial_min.load(radial_min.io.hub.DEFAULT_MODEL)
    i8 = radial_min.load(radial_min.io.hub.DEFAULT_MODEL, weights_dtype="int8")
    b32, b8 = sum(a.nbytes for a in f32.arrays()), sum(a.nbytes for a in i8.arrays())
    assert b32 == 4 * f32.n_params and b8 <= 0.3 * b32
    ids = radial_min.Tokenizer(f32.path).encode("And God said")
    np.testing.assert_array_equal(
        radial_min.generate(i8, ids, 60, repetition_penalty=1.2),
        radial_min.generate(f32, ids, 60, repetition_penalty=1.2),
    )


def test_int8_refuses_what_it_cannot_quantize(monkeypatch):
    """A checkpoint with a weight that is not a 2-D matrix (a ViT's convolution kernel) and an unknown dtype name:
    one error naming it, raised before any tensor is read."""

    def no_reading(*args):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(radial_min.io.loading, "read_checked", no_reading)
    with pytest.raises(radial_min.RadialError, match=r"patch_embeddings.projection.weight is 4-D") as e:
        radial_min.load(FIXTURES / "vit-cls", weights_dtype="int8")
    assert "\n" not in str(e.value)
    with pytest.raises(
        ValueError, match="weights dtype must be one of float32, float16, bfloat16, int8, native, got 'int4'"
    ):
        radial_min.load(FIXTURES / "opt-pre", weights_dtype="int4")

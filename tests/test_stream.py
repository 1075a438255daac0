"""Layer-major execution with streamed weights (radial_min/analysis/stream.py): the same ratios, runs, labels and output
files as the in-memory path on every fixture layout, each block read just before it runs and freed after, the LM
head in pieces, resumption after an interruption, and one-line refusals for checkpoints that cannot be streamed."""

import importlib.util
import gc
import json
import os
import re
import shutil
import sys
import weakref
import zipfile

import numpy as np
import pytest
from conftest import FIXTURES

import radial_min
from radial_min import kernels, progress
from radial_min.analysis import layer_major, memory, oracle, profiling, stream
from radial_min import router as R
from radial_min.data import train_tokenizer
from radial_min.errors import CheckpointError
from radial_min.analysis import distill
from radial_min.analysis.distill import RouterDecisions

sys.path.insert(0, str(FIXTURES.parent.parent))
import cli  # noqa: E402

SEQS = np.random.default_rng(0).integers(3, 60, size=(3, 16))
TAU = 0.3  # on opt-pre: skips some blocks and keeps others
STREAMABLE = [
    "opt-pre",
    "opt-350m-style",
    "opt-bf16-hub",
    "opt-fp16-sharded",
    "opt-nobias-gelu",
    "opt-hub-bin",
    "opt-bin-sharded",
    "llama-gqa-tied",
    "llama-mha-untied-bf16",
    "qwen2-bias",
]


def assert_same_run(a, b):
    for field in ("keep", "ratios", "nll"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.parametrize("name", STREAMABLE)
def test_streamed_passes_equal_the_in_memory_ones(name):
    """Bit for bit: the same blocks and kernels, only the loop order and the weights' lifetime differ."""
    streamed, loaded = stream.StreamedModel(FIXTURES / name), radial_min.load(FIXTURES / name)
    ratios = profiling.profile_text(streamed, SEQS)
    np.testing.assert_array_equal(ratios, profiling.profile_text(loaded, SEQS))
    tau = float(np.quantile(ratios, 0.3))  # skips some blocks and keeps others: the decisions are exercised
    for rule in oracle.KV_RULES:
        run = oracle.simulate(streamed, SEQS, oracle.threshold(tau), rule)
        assert 0 < run.keep.mean() < 1
        assert_same_run(run, oracle.simulate(loaded, SEQS, oracle.threshold(tau), rule))
    a, b = distill.oracle_examples(streamed, SEQS, tau, "drop"), distill.oracle_examples(loaded, SEQS, tau, "drop")
    assert a.keys() == b.keys()
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("quant", [None, "Q4_1"])
def test_gguf_streams(tmp_path, quant):
    gguf = pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    from test_gguf import write_gguf

    path = write_gguf(tmp_path / "m.gguf", None if quant is None else getattr(gguf.GGMLQuantizationType, quant))
    streamed, loaded = stream.StreamedModel(path), radial_min.load(path)
    assert_same_run(
        oracle.simulate(streamed, SEQS, oracle.threshold(TAU), "drop"),
        oracle.simulate(loaded, SEQS, oracle.threshold(TAU), "drop"),
    )


def test_a_stateful_decision_rule_gets_one_copy_per_sequence():
    """A router's decisions carry state per sequence (next block, depth): block-major, each sequence has its own."""
    loaded = radial_min.load(FIXTURES / "opt-pre")
    ex = distill.oracle_examples(loaded, SEQS, TAU, "drop")
    router = distill.train_router(ex, R.RouterConfig(width=32, n_blocks=6, hidden=8), epochs=2, progress=False)
    run = oracle.simulate(stream.StreamedModel(FIXTURES / "opt-pre"), SEQS, RouterDecisions(router), "drop")
    assert_same_run(run, oracle.simulate(loaded, SEQS, RouterDecisions(router), "drop"))
    assert len(set(run.depth.tolist())) > 1


def test_the_head_is_read_in_pieces_no_larger_than_a_block(matmul_backend, monkeypatch):
    """Pieces of whole sgemm column tiles (kernels.BLAS_COLUMNS): the logits equal the whole head's bit for bit
    under both many-row backends (the numba matmul's columns do not interact; sgemm's tiles are fixed)."""
    monkeypatch.setattr(kernels, "BLAS_COLUMNS", 64)
    monkeypatch.setattr(stream, "HEAD_ROWS_ALIGN", 64)
    streamed, loaded = stream.StreamedModel(FIXTURES / "opt-pre"), radial_min.load(FIXTURES / "opt-pre")
    monkeypatch.setattr(streamed, "largest_block_bytes", lambda: 2 * 100 * 32 * 4)  # 100 rows: 64 once aligned
    pieces = streamed.head_pieces()
    assert pieces[:2] == [(0, 64), (64, 128)] and pieces[-1][1] == loaded.config.vocab_size == 384
    x = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    np.testing.assert_array_equal(streamed.head(x), loaded.head(x))


@pytest.mark.slow
def test_each_block_is_read_just_before_it_runs_and_freed_before_the_next(monkeypatch):
    model = stream.StreamedModel(FIXTURES / "opt-fp16-sharded")
    reads, alive, events = [], [], []
    real_read, real_load = model.store.read, model.load_block
    monkeypatch.setattr(model.store, "read", lambda n: (reads.append(n), real_read(n))[1])

    def load_block(b):
        gc.collect()
        events.append(("load", b, sum(r() is not None for r in alive)))  # blocks still in memory at this point
        block = real_load(b)
        first = block.qkv.weight if block.kind == "att" else block.fc1.weight
        alive.append(weakref.ref(first))
        return block

    monkeypatch.setattr(model, "load_block", load_block)
    model.progress = lambda items, b: (events.append(("run", b, len(reads))), items)[1]
    profiling.profile_text(model, SEQS)
    assert [e[2] for e in events if e[0] == "load"] == [0] * len(model.blocks)  # the previous block was freed
    starts = [r for e, b, r in events if e == "run"]
    assert starts == sorted(starts) and len(set(starts)) == len(model.blocks)  # new tensors read for every block
    assert not any("embed_tokens" in n for n in reads)  # embedding rows come from the file, never the matrix


def interrupt_at(block, after_sequences=0):
    """A progress wrapper that stops the pass (as Ctrl-C does) at `block`, after some of its sequences."""

    def progress(items, b):
        for i, s in enumerate(items):
            if b == block and i == after_sequences:
                raise KeyboardInterrupt
            yield s

    return progress


def run_again(model):
    ran = []
    model.progress = lambda items, b: (ran.append(b), items)[1]
    return ran


@pytest.mark.parametrize("on_disk", [False, True])
def test_interrupted_simulation_resumes_at_its_block(tmp_path, on_disk):
    """In memory, or with the states in two memory-mapped scratch files (interrupted halfway through a block,
    after one sequence's states were overwritten): the resumed run gives the uninterrupted run's numbers."""
    limit = 0 if on_disk else None
    model = stream.StreamedModel(FIXTURES / "opt-pre", state_dir=tmp_path / "state", scratch_limit=limit)
    full = oracle.simulate(radial_min.load(FIXTURES / "opt-pre"), SEQS, oracle.threshold(TAU), "drop")
    model.progress = interrupt_at(3, after_sequences=1)
    with pytest.raises(KeyboardInterrupt):
        oracle.simulate(model, SEQS, oracle.threshold(TAU), "drop")
    assert (tmp_path / "state" / "states-1.npy").is_file() == on_disk
    ran = run_again(model)
    assert_same_run(oracle.simulate(model, SEQS, oracle.threshold(TAU), "drop"), full)
    assert ran == list(range(3, len(model.blocks))) + [len(model.blocks)]  # blocks 3.. and the head
    assert not (tmp_path / "state" / "state.npz").exists() and not (tmp_path / "state" / "states-0.npy").exists()


def test_interrupted_profile_resumes_and_clear_leaves_nothing(tmp_path):
    model = stream.StreamedModel(FIXTURES / "opt-pre", state_dir=tmp_path / "state")
    full = profiling.profile_text(radial_min.load(FIXTURES / "opt-pre"), SEQS)
    model.progress = interrupt_at(2)
    with pytest.raises(KeyboardInterrupt):
        profiling.profile_text(model, SEQS)
    ran = run_again(model)
    np.testing.assert_array_equal(profiling.profile_text(model, SEQS), full)
    assert ran == list(range(2, len(model.blocks)))
    layer_major.clear(tmp_path / "state")
    assert not (tmp_path / "state").exists()


def test_a_checkpoint_of_other_weights_is_not_resumed(tmp_path):
    folder = tmp_path / "opt-pre"
    shutil.copytree(FIXTURES / "opt-pre", folder)
    model = stream.StreamedModel(folder, state_dir=tmp_path / "state")
    model.progress = interrupt_at(2)
    with pytest.raises(KeyboardInterrupt):
        profiling.profile_text(model, SEQS)
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the file was replaced
    model = stream.StreamedModel(folder, state_dir=tmp_path / "state")
    ran = run_again(model)
    profiling.profile_text(model, SEQS)
    assert ran == list(range(len(model.blocks)))  # started over


def test_interrupted_router_decisions_and_labels_resume(tmp_path):
    """A stateful rule's per-sequence state and the labels' state columns are checkpointed with the states."""
    loaded = radial_min.load(FIXTURES / "opt-pre")
    ex = distill.oracle_examples(loaded, SEQS, TAU, "drop")
    router = distill.train_router(ex, R.RouterConfig(width=32, n_blocks=6, hidden=8), epochs=2, progress=False)
    model = stream.StreamedModel(FIXTURES / "opt-pre", state_dir=tmp_path / "state")
    for run in (
        lambda: oracle.simulate(model, SEQS, RouterDecisions(router), "drop"),
        lambda: distill.oracle_examples(model, SEQS, TAU, "drop"),
    ):
        model.progress = interrupt_at(4, after_sequences=2)
        with pytest.raises(KeyboardInterrupt):
            run()
        ran = run_again(model)
        got = run()
        assert ran[0] == 4
        if isinstance(got, dict):
            for k in ex:
                np.testing.assert_array_equal(got[k], ex[k], err_msg=k)
        else:
            assert_same_run(got, oracle.simulate(loaded, SEQS, RouterDecisions(router), "drop"))


class Passes:
    """A model's progress that records each pass run (label, first step) and each pass kept whole from an earlier
    run, and stops pass `stop[0]` at block `stop[1]`."""

    def __init__(self, stop=None):
        self.begun, self.kept, self.stop = [], [], stop

    def begin(self, label, steps, start, n_seq):
        (self.kept.append(label) if start == len(steps) else self.begun.append((label, start)))

    def __call__(self, items, b):
        if self.stop == (len(self.begun), b):
            raise KeyboardInterrupt
        return items


def test_a_sweep_resumed_does_not_run_finished_passes_again(tmp_path):
    loaded = radial_min.load(FIXTURES / "opt-pre")
    want = oracle.sweep(loaded, SEQS, [0, TAU], ["fill", "drop"])
    model = stream.StreamedModel(FIXTURES / "opt-pre", state_dir=tmp_path / "state")
    model.progress = Passes(stop=(3, 2))
    with pytest.raises(KeyboardInterrupt):
        oracle.sweep(model, SEQS, [0, TAU], ["fill", "drop"])
    first = model.progress.begun
    labels = ["tau=0 (sequential)", f"oracle tau={TAU:g}, fill", f"oracle tau={TAU:g}, drop"]
    assert [label for label, _ in first] == labels
    model.progress = Passes()
    got = oracle.sweep(model, SEQS, [0, TAU], ["fill", "drop"])
    again = model.progress.begun
    assert again[0] == (f"oracle tau={TAU:g}, drop", 2) and model.progress.kept[:2] == labels[:2]  # 3 resumed
    assert not set(first[:2]) & set(again)
    assert got["rows"] == want["rows"]
    np.testing.assert_array_equal(got["mean_ratio"], want["mean_ratio"])


# --------------------------------------------------------------------------------------- what is not streamed


def test_a_bin_whose_storage_spans_blocks_is_refused_in_one_line():
    with pytest.raises(stream.NotStreamable, match=r"storage '0' holds tensors of L0\.att and L0\.ffn and more") as e:
        stream.StreamedModel(FIXTURES / "opt-bin-shared")
    assert "\n" not in str(e.value)
    assert radial_min.load(FIXTURES / "opt-bin-shared").n_params == radial_min.load(FIXTURES / "opt-hub-bin").n_params


def test_a_compressed_or_corrupt_bin_embedding(tmp_path):
    """Embedding rows are read straight from the .bin's uncompressed record, after its CRC has been checked."""
    src = FIXTURES / "opt-hub-bin" / "pytorch_model.bin"
    for name, compression in (("deflated", zipfile.ZIP_DEFLATED), ("corrupt", zipfile.ZIP_STORED)):
        (tmp_path / name).mkdir()
        shutil.copy(FIXTURES / "opt-hub-bin" / "config.json", tmp_path / name)
        dst = tmp_path / name / "pytorch_model.bin"
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
            for info in zin.infolist():
                zout.writestr(info.filename, zin.read(info))
    path = tmp_path / "corrupt" / "pytorch_model.bin"
    with zipfile.ZipFile(path) as z:
        biggest = max(z.infolist(), key=lambda i: i.file_size)  # the embedding's storage
    data = bytearray(path.read_bytes())
    data[biggest.header_offset + 30 + len(biggest.filename) + 100] ^= 1  # one bit, past the CRC's back
    path.write_bytes(bytes(data))
    with pytest.raises(stream.NotStreamable, match="is not stored as plain rows in an uncompressed record"):
        stream.StreamedModel(tmp_path / "deflated")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        stream.StreamedModel(tmp_path / "corrupt")


def test_nan_weights_are_named_when_their_block_is_read(tmp_path):
    from radial_min.io.checkpoint import SafetensorsFile, write_safetensors

    folder = tmp_path / "nan"
    shutil.copytree(FIXTURES / "opt-pre", folder)
    f = SafetensorsFile(folder / "model.safetensors")
    tensors = {n: f.read(n) for n in f.entries}
    name = next(n for n in tensors if n.endswith("decoder.layers.1.fc1.weight"))
    tensors[name][0, 0] = np.nan
    write_safetensors(folder / "model.safetensors", tensors)
    model = stream.StreamedModel(folder)
    with pytest.raises(CheckpointError, match=f"'{name}' has 1 NaN or infinite value of"):
        profiling.profile_text(model, SEQS)


# ------------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """Fixture checkpoints with a tokenizer, and a text to pack."""
    root = tmp_path_factory.mktemp("stream")
    folders = {}
    for name in ("opt-fp16-sharded", "opt-bin-shared"):
        folders[name] = root / name
        shutil.copytree(FIXTURES / name, folders[name])
        train_tokenizer(["In the beginning God created the heaven and the earth. " * 4] * 40, 384, folders[name])
    text = root / "text.txt"
    text.write_text("And the earth was without form, and void; and darkness was upon the face of the deep. " * 30)
    return folders, text


def run_cli(capsys, argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_same_files(a, b, skip=()):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()), (names, sorted(p.name for p in b.iterdir()))
    for name in names:
        if name not in skip:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


COMMANDS = {
    "profile": ["--seq-len", 16, "--max-sequences", 4],
    "simulate": ["--seq-len", 16, "--max-sequences", 4, "--taus", f"0,{TAU}"],
    "train-router": ["--seq-len", 16, "--max-sequences", 4, "--test-sequences", 3, "--tau", TAU, "--epochs", 2],
}


def command(name, folder, text, out):
    texts = ["--train-text", text, "--test-text", text] if name == "train-router" else ["--text", text]
    return [name, "--model", folder, *texts, *COMMANDS[name], "--out", out]


@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.slow
def test_cli_stream_writes_the_same_files(capsys, tmp_path, with_tokenizer, name):
    folders, text = with_tokenizer
    code, _, _ = run_cli(capsys, command(name, folders["opt-fp16-sharded"], text, tmp_path / "memory"))
    assert code == 0
    code, out, err = run_cli(capsys, command(name, folders["opt-fp16-sharded"], text, tmp_path / "st") + ["--stream"])
    assert code == 0
    assert "streaming weights block by block (--stream)" in err and "peak memory (VmHWM)" in out
    report = {"train-router": "train_router.json"}.get(name)  # it names its own folder
    names = assert_same_files(tmp_path / "memory", tmp_path / "st", skip=(report,))
    plots = importlib.util.find_spec("matplotlib") is not None  # the .png files need it (the plots extra)
    assert len(names) >= (5 if plots else 2) and not any(n.startswith(".stream") for n in names)  # checkpoints cleared
    if report:
        a, b = ((tmp_path / d / report).read_text() for d in ("memory", "st"))
        assert a.replace(str(tmp_path / "memory"), "") == b.replace(str(tmp_path / "st"), "")


@pytest.mark.slow
def test_profile_overlays_streamed_and_loaded_models_by_size(capsys, tmp_path, with_tokenizer):
    """`profile --model A --model B --stream`: A streamed, B (not streamable) loaded whole; the same files as
    without --stream, with the median-ratio-by-size table, CSV and plot."""
    folders, text = with_tokenizer
    models = ["--model", folders["opt-fp16-sharded"], "--model", folders["opt-bin-shared"]]
    argv = ["profile", *models, "--text", text, *COMMANDS["profile"]]
    assert run_cli(capsys, [*argv, "--out", tmp_path / "memory"])[0] == 0
    code, out, err = run_cli(capsys, [*argv, "--out", tmp_path / "st", "--stream"])
    assert code == 0 and "opt-fp16-sharded: streaming weights" in err and "not streaming (" in err
    names = assert_same_files(tmp_path / "memory", tmp_path / "st")
    plots = {"median_by_size.png", "ratio_hist.png"} if importlib.util.find_spec("matplotlib") else set()
    assert {"sizes.csv"} | plots <= set(names)
    rows = (tmp_path / "st" / "sizes.csv").read_text().splitlines()
    summary = json.loads((tmp_path / "st" / "summary.json").read_text())
    for row in rows[1:]:
        label, params, median = row.split(",")[:3]
        assert int(params) == radial_min.load(folders[label]).n_params
        assert float(median) == summary[f"{label}/prefill"]["overall"]["median"]
    assert "median     att     ffn" in out


@pytest.mark.slow
def test_interrupted_simulate_command_resumes_with_the_same_files(capsys, tmp_path, with_tokenizer, monkeypatch):
    folders, text = with_tokenizer
    argv = command("simulate", folders["opt-fp16-sharded"], text, tmp_path / "memory")
    assert run_cli(capsys, argv)[0] == 0
    loads, real = [], stream.StreamedModel.load_block

    def load_block(self, b):
        loads.append(b)
        if loads == [0, 1, 2, 3, 4, 5] * 2 + [0, 1, 2]:  # the third pass (6 blocks each), block 2
            raise KeyboardInterrupt
        return real(self, b)

    monkeypatch.setattr(stream.StreamedModel, "load_block", load_block)
    argv = command("simulate", folders["opt-fp16-sharded"], text, tmp_path / "stream") + ["--stream"]
    code, _, err = run_cli(capsys, argv)
    assert code == 130 and "interrupted" in err and (tmp_path / "stream" / ".stream").is_dir()
    loads.clear()
    code, _, err = run_cli(capsys, argv)
    assert code == 0 and loads[:4] == [2, 3, 4, 5]  # the first two passes were kept, the third resumed at its block
    assert re.search(r"^opt-fp16-sharded  ([\d,]+)/\1 seq-block \(100%\)", err, re.M), err  # the kept work counted
    assert_same_files(tmp_path / "memory", tmp_path / "stream")


@pytest.mark.slow
def test_streamed_simulate_counts_every_pass_on_one_bar(capsys, tmp_path, with_tokenizer, monkeypatch):
    """simulate --stream: one bar, never restarting, over each sequence through each block and the head of every
    pass (the sweep's, the baselines', the routing trace's), its total known before the last passes run, each
    pass named as in memory."""
    folders, text = with_tokenizer
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0)  # stderr is not a terminal: a plain line at every count
    code, _, err = run_cli(
        capsys, command("simulate", folders["opt-fp16-sharded"], text, tmp_path / "st") + ["--stream"]
    )
    assert code == 0
    lines = [line for line in err.splitlines() if re.search(r"/[\d,]+\+? seq-block", line)]  # once there is work
    counts = [
        [int(n.replace(",", "")) for n in re.search(r" ([\d,]+)/([\d,]+)\+? seq-block", line).groups()]
        for line in lines
    ]
    done = [n for n, _ in counts]
    assert done == sorted(done) and counts[-1][0] == counts[-1][1] and "(100%)" in lines[-1]
    statics = [r for r in json.loads((tmp_path / "st" / "simulate.json").read_text())["static"] if r["k"]]
    n_seq, steps = 4, 6 + 1  # --max-sequences 4, six blocks and the head
    assert counts[-1][1] == (3 + len(statics)) * n_seq * steps + 1 * steps  # 3 oracle passes, baselines, trace
    known = next(i for i, line in enumerate(lines) if "about" in line)  # the time left: "at least" until then
    assert all("left" not in line or "at least" in line for line in lines[:known])
    assert counts[known][0] <= 3 * n_seq * steps + 1 and {t for _, t in counts[known:]} == {counts[-1][1]}
    assert not any("threshold(" in line for line in lines)
    for label in ("tau=0 (sequential)", f"oracle tau={TAU:g}, drop", "static, ", "routing trace: oracle"):
        assert any(f"opt-fp16-sharded: {label}" in line for line in lines), label


@pytest.mark.slow
def test_streaming_switches_on_when_the_model_would_not_fit(capsys, tmp_path, with_tokenizer, monkeypatch):
    folders, text = with_tokenizer
    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000)
    code, _, err = run_cli(capsys, command("profile", folders["opt-fp16-sharded"], text, tmp_path / "auto"))
    assert code == 0 and "streaming weights block by block (automatic: the model needs" in err


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_streamed_is_loaded_whole_if_it_fits(capsys, tmp_path, with_tokenizer, monkeypatch):
    folders, text = with_tokenizer
    code, _, err = run_cli(capsys, command("profile", folders["opt-bin-shared"], text, tmp_path / "a") + ["--stream"])
    assert code == 0 and "not streaming (" in err and "storage '0' holds tensors of" in err
    assert "loading it whole" in err
    monkeypatch.setattr(memory, "available_bytes", lambda: 10_000)
    code, _, err = run_cli(capsys, command("profile", folders["opt-bin-shared"], text, tmp_path / "b"))
    assert code == 2 and err.startswith("error: --model") and "does not fit in memory and cannot be streamed" in err
    assert err.count("\n") == 1

"""Layer-major profiling with streamed weights: the same ratios and output files as the in-memory path, bounded
reads, resumption after an interruption, and the one-line fallback for checkpoints that cannot be streamed."""
import shutil
import sys

import numpy as np
import pytest
from conftest import FIXTURES

import radial_min
from radial_min import profiling, stream
from radial_min.data import train_tokenizer

sys.path.insert(0, str(FIXTURES.parent.parent))
import cli  # noqa: E402

SEQS = np.random.default_rng(0).integers(3, 60, size=(3, 16))
STREAMABLE = ["opt-pre", "opt-350m-style", "opt-bf16-hub", "opt-fp16-sharded", "opt-nobias-gelu"]


@pytest.mark.parametrize("name", STREAMABLE)
def test_streamed_ratios_are_the_in_memory_ratios(name):
    """Bit for bit: the same blocks and kernels, only the loop order and the weights' lifetime differ."""
    a = stream.profile_text(stream.StreamedOPT(FIXTURES / name), SEQS)
    b = profiling.profile_text(radial_min.load(FIXTURES / name), SEQS)
    np.testing.assert_array_equal(a, b)


def test_each_block_is_read_just_before_it_runs(monkeypatch):
    model = stream.StreamedOPT(FIXTURES / "opt-fp16-sharded")
    reads = []
    real = model.store.read
    monkeypatch.setattr(model.store, "read", lambda n: (reads.append(n), real(n))[1])
    events = []
    stream.profile_text(model, SEQS, progress=lambda items, b: (events.append(("run", b, len(reads))), items)[1])
    starts = [r for e, b, r in events]
    assert starts == sorted(starts) and len(set(starts)) == len(model.blocks)  # new tensors read for every block
    assert not any("embed_tokens" in n for n in reads)  # embedding rows come from the mapped file, never the matrix


def test_interrupted_run_resumes_at_its_block(tmp_path):
    model = stream.StreamedOPT(FIXTURES / "opt-pre")
    full = stream.profile_text(model, SEQS)

    def stop_at_3(items, b):
        if b == 3:
            raise KeyboardInterrupt
        return items

    with pytest.raises(KeyboardInterrupt):
        stream.profile_text(model, SEQS, state_dir=tmp_path / "state", progress=stop_at_3)
    ran = []
    again = stream.profile_text(model, SEQS, state_dir=tmp_path / "state", progress=lambda items, b: (ran.append(b), items)[1])
    assert ran == list(range(3, len(model.blocks)))  # blocks 0-2 were checkpointed, not run again
    np.testing.assert_array_equal(again, full)
    assert not (tmp_path / "state").exists()  # cleaned up once done


def test_memory_mapped_states_give_the_same_ratios(tmp_path):
    model = stream.StreamedOPT(FIXTURES / "opt-pre")
    a = stream.profile_text(model, SEQS, state_dir=tmp_path / "s", scratch_limit=0)  # states on disk
    np.testing.assert_array_equal(a, stream.profile_text(model, SEQS))


def test_pytorch_bin_is_not_streamed():
    with pytest.raises(stream.NotStreamable, match="pytorch_model.bin"):
        stream.StreamedOPT(FIXTURES / "opt-hub-bin")


@pytest.fixture(scope="module")
def sharded_with_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream") / "opt-sharded-tok"
    shutil.copytree(FIXTURES / "opt-fp16-sharded", folder)
    train_tokenizer(["In the beginning God created the heaven and the earth. " * 4] * 40, 384, folder)
    text = folder.parent / "text.txt"
    text.write_text("And the earth was without form, and void; and darkness was upon the face of the deep. " * 30)
    return folder, text


def test_profile_cli_stream_writes_the_same_files(capsys, tmp_path, sharded_with_tokenizer):
    folder, text = sharded_with_tokenizer
    outs = {}
    for flag in ([], ["--stream"]):
        out = tmp_path / ("stream" if flag else "memory")
        argv = ["profile", "--model", str(folder), "--text", str(text), "--seq-len", "16", "--max-sequences", "4", "--out", str(out)]
        assert cli.main(argv + flag) == 0
        outs[bool(flag)] = capsys.readouterr()
    assert "streaming weights block by block (--stream)" in outs[True].err
    assert "peak memory (VmHWM)" in outs[True].out
    mem, st = tmp_path / "memory", tmp_path / "stream"
    names = sorted(p.name for p in mem.iterdir())
    assert names == sorted(p.name for p in st.iterdir()) and "summary.json" in names
    for name in names:
        assert (mem / name).read_bytes() == (st / name).read_bytes(), name
    for name in names:
        if name.endswith(".npz"):
            with np.load(mem / name) as a, np.load(st / name) as b:
                np.testing.assert_array_equal(a["ratios"], b["ratios"])

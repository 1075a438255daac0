"""Where checkpoints come from: local folders as given, Hub ids into weights/<name>/ (the Hub is faked here)."""

import fnmatch
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import radial_min
import radial_min.io.checkpoint
import radial_min.io.hub
import radial_min.io.torch_pickle
from radial_min.errors import CheckpointError

huggingface_hub = pytest.importorskip("huggingface_hub")
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """weights/ in a temporary folder, so nothing is written into the repository."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setattr(radial_min.io.hub, "WEIGHTS", folder)
    return folder


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: copies the files of `repo` that match allow_patterns."""

    def __init__(self, repo: Path | None, error: Exception | None = None):
        self.repo, self.error, self.calls = repo, error, []

    def __call__(self, repo_id, local_dir=None, allow_patterns=None, **kw):
        self.calls.append((repo_id, Path(local_dir), list(allow_patterns or [])))
        if self.error is not None:
            raise self.error
        local = Path(local_dir)
        local.mkdir(parents=True, exist_ok=True)
        for f in self.repo.iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, local / f.name)
        return str(local)

    def fetched(self):
        """Names of the files each call brought."""
        return [
            sorted(f.name for f in self.repo.iterdir() if any(fnmatch.fnmatch(f.name, p) for p in pats))
            for _, _, pats in self.calls
        ]


def fake_repo(tmp_path, *names, source="opt-hub-bin"):
    repo = tmp_path / "hub-repo"
    repo.mkdir()
    for name in names:
        shutil.copy(FIXTURES / source / name, repo / name)
    return repo


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------------------------ resolve


def test_local_folder_is_returned_as_is(weights, monkeypatch):
    hub = FakeHub(None, RuntimeError("must not download"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    folder = FIXTURES / "opt-pre"
    assert radial_min.io.hub.resolve(folder) == folder
    assert radial_min.io.hub.resolve(str(folder)) == folder
    assert hub.calls == [] and list(weights.iterdir()) == []


def test_a_file_is_not_a_checkpoint(weights):
    path = FIXTURES / "opt-pre" / "config.json"
    with pytest.raises(CheckpointError) as e:
        radial_min.io.hub.resolve(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: is a file") and "config.json and the weights" in msg


def test_a_missing_path_that_cannot_be_a_hub_id(weights, tmp_path, monkeypatch):
    hub = FakeHub(None, RuntimeError("must not download"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(missing))}: no such checkpoint folder$"):
        radial_min.load(missing)
    assert hub.calls == []


def test_downloaded_before_is_not_downloaded_again(weights, monkeypatch):
    shutil.copytree(FIXTURES / "opt-pre", weights / "opt-tiny")
    hub = FakeHub(None, RuntimeError("must not download"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    assert radial_min.io.hub.resolve("someone/opt-tiny") == weights / "opt-tiny"
    assert radial_min.load("someone/opt-tiny").config.vocab_size == 384
    assert hub.calls == []


# ------------------------------------------------------------------------------------------------ download


def offline_error():
    return huggingface_hub.errors.LocalEntryNotFoundError(
        "Cannot find an appropriate cached snapshot folder for the specified revision on the local disk and outgoing "
        "traffic has been disabled. To enable repo look-ups and downloads online, set 'HF_HUB_OFFLINE=0' as "
        "environment variable.\nsecond line of detail"
    )


def test_offline_download_gives_one_clear_error(weights, monkeypatch):
    hub = FakeHub(None, offline_error())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    with pytest.raises(CheckpointError) as e:
        radial_min.load("facebook/opt-125m")
    msg = str(e.value)
    local = weights / "opt-125m"
    assert "\n" not in msg and "second line" not in msg
    assert msg.startswith("facebook/opt-125m: not a local folder, and downloading it from the Hugging Face Hub failed")
    assert "LocalEntryNotFoundError" in msg and "outgoing traffic has been disabled" in msg
    for needed in ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.json", "merges.txt"):
        assert needed in msg
    assert f"in {local}/ and pass --model {local}" in msg
    ((repo_id, local_dir, patterns),) = hub.calls
    assert (repo_id, local_dir) == ("facebook/opt-125m", local)
    assert "config.json" in patterns and "model.safetensors" in patterns and "vocab.json" in patterns
    assert not any(p.startswith("pytorch_model") for p in patterns)  # pickles are asked for only when needed


def test_any_download_failure_is_a_checkpoint_error(weights, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(None, ConnectionError("")))
    with pytest.raises(CheckpointError, match=r"org/model: .*failed \(ConnectionError: ConnectionError\)"):
        radial_min.io.hub.resolve("org/model")


@pytest.mark.slow
def test_bin_only_repo_is_converted_once_to_safetensors(weights, tmp_path, monkeypatch):
    repo = fake_repo(tmp_path, "config.json", "pytorch_model.bin")
    hub = FakeHub(repo)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    writes = []
    real_write = radial_min.io.hub.write_safetensors_from
    monkeypatch.setattr(
        radial_min.io.hub, "write_safetensors_from", lambda *a, **k: (writes.append(a[0]), real_write(*a, **k))
    )

    model = radial_min.load("facebook/opt-hub-bin")
    local = weights / "opt-hub-bin"
    assert model.path == local
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == ["config.json", "model.safetensors"]
    assert writes == [local / "model.safetensors"]
    assert hub.fetched() == [["config.json"], ["pytorch_model.bin"]]  # the pickle only after no safetensors were found

    ref = np.load(FIXTURES / "opt-hub-bin" / "reference.npz")
    logits = model.forward(ref["input_ids"])
    assert rel_err(logits, ref["logits"]) <= 1e-4
    np.testing.assert_array_equal(logits, radial_min.load(FIXTURES / "opt-hub-bin").forward(ref["input_ids"]))
    assert set(model.dtypes_on_disk) == {"float32"}

    again = radial_min.load("facebook/opt-hub-bin")  # second time: no download, no conversion
    assert len(hub.calls) == 2 and len(writes) == 1
    np.testing.assert_array_equal(again.forward(ref["input_ids"]), logits)


def test_repo_with_safetensors_never_fetches_the_pickle(weights, tmp_path, monkeypatch):
    repo = fake_repo(tmp_path, "config.json", "model.safetensors", "generation_config.json", source="opt-pre")
    shutil.copy(FIXTURES / "opt-hub-bin" / "pytorch_model.bin", repo / "pytorch_model.bin")
    hub = FakeHub(repo)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    model = radial_min.load("org/opt-pre")
    assert len(hub.calls) == 1
    assert not (weights / "opt-pre" / "pytorch_model.bin").exists()
    kept = [".hub_repo", "config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in (weights / "opt-pre").iterdir()) == kept
    assert model.config.num_hidden_layers == 3


def test_same_name_from_another_repo_gets_its_own_folder(weights, tmp_path, monkeypatch):
    """weights/<name>/ remembers which repo filled it; a different org's repo of the same name goes elsewhere."""
    repo = fake_repo(tmp_path, "config.json", "model.safetensors", source="opt-pre")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(repo))
    assert radial_min.io.hub.resolve("facebook/opt-pre") == weights / "opt-pre"
    assert (weights / "opt-pre" / ".hub_repo").read_text().strip() == "facebook/opt-pre"
    assert radial_min.io.hub.resolve("facebook/opt-pre") == weights / "opt-pre"  # cached
    assert radial_min.io.hub.resolve("someone/opt-pre") == weights / "someone--opt-pre"


def test_an_interrupted_download_is_resumed(weights, tmp_path, monkeypatch):
    """A folder with config.json but no weights (a download cut short) is fetched again, not taken as done."""
    (weights / "opt-pre").mkdir()
    shutil.copy(FIXTURES / "opt-pre" / "config.json", weights / "opt-pre" / "config.json")
    hub = FakeHub(fake_repo(tmp_path, "config.json", "model.safetensors", source="opt-pre"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    assert radial_min.load("org/opt-pre").config.num_hidden_layers == 3
    assert len(hub.calls) == 1


def test_sharded_bin_repo_is_converted_shard_by_shard(weights, tmp_path, monkeypatch):
    """The Hub's large OPT repos hold sharded pickles: each shard becomes a safetensors shard, read one tensor at a
    time (never the whole model), with an index written last."""
    names = sorted(p.name for p in (FIXTURES / "opt-bin-sharded").iterdir())
    repo = fake_repo(tmp_path, *names, source="opt-bin-sharded")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(repo))
    monkeypatch.setattr(
        radial_min.io.torch_pickle, "load_torch_file", lambda *a: pytest.fail("a whole shard was loaded")
    )
    reads = []
    real_read = radial_min.io.torch_pickle.TorchFile.read_stored
    monkeypatch.setattr(
        radial_min.io.torch_pickle.TorchFile, "read_stored", lambda f, n: (reads.append(n), real_read(f, n))[1]
    )
    model = radial_min.load("facebook/opt-bin-sharded")
    local = weights / "opt-bin-sharded"
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == [
        "config.json",
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    assert sorted(reads) == sorted(set(reads))  # each tensor read once, on its own
    ref = np.load(FIXTURES / "opt-hub-bin" / "reference.npz")
    want = radial_min.load(FIXTURES / "opt-hub-bin").forward(ref["input_ids"])
    np.testing.assert_array_equal(model.forward(ref["input_ids"]), want)


def test_bfloat16_survives_conversion(tmp_path):
    """Converting a bf16 pickle keeps bf16 on disk (the upcast to float32 on reading is exact, so is the way back)."""
    from radial_min.io.checkpoint import SafetensorsFile, write_safetensors

    x = np.array([[1.0, -2.5, 3.140625, 2.0**-70]], np.float32)
    write_safetensors(tmp_path / "m.safetensors", {"w": x, "b": x[0]}, bfloat16={"w"})
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert f.dtype("w") == "bfloat16" and f.dtype("b") == "float32"
    np.testing.assert_array_equal(f.read("w"), x)
    assert (tmp_path / "m.safetensors").stat().st_size < 8 + 200 + 4 * 2 + 4 * 4


def test_repo_without_weights(weights, tmp_path, monkeypatch):
    hub = FakeHub(fake_repo(tmp_path, "config.json"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    with pytest.raises(CheckpointError) as e:
        radial_min.load("org/empty-model")
    assert str(e.value) == (
        f"{weights / 'empty-model'}: has no usable weights; expected model.safetensors, model.safetensors.index.json "
        "or pytorch_model.bin"
    )


def test_repo_without_config(weights, tmp_path, monkeypatch):
    hub = FakeHub(fake_repo(tmp_path, "pytorch_model.bin"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    with pytest.raises(CheckpointError) as e:
        radial_min.io.hub.resolve("org/not-a-model")
    assert str(e.value) == (
        "org/not-a-model: the Hub repo has no config.json; "
        f"place a Hugging Face checkpoint in {weights / 'not-a-model'}/"
    )
    assert len(hub.calls) == 1  # no point fetching weights for a repo without a config


def test_ensure_safetensors_leaves_safetensors_alone(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(FIXTURES / "opt-pre", folder)
    before = (folder / "model.safetensors").read_bytes()
    radial_min.io.hub.ensure_safetensors(folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (FIXTURES / "opt-pre").iterdir())


def test_a_mistyped_local_folder_is_not_taken_for_a_hub_id(weights, tmp_path, monkeypatch):
    """`weights/typo` looks like ORG/NAME, but ./weights/ exists: a local path, refused without a download."""
    hub = FakeHub(None, RuntimeError("must not download"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights" / "opt-kjv-wiki").mkdir(parents=True)
    with pytest.raises(CheckpointError) as e:
        radial_min.load("weights/typo")
    assert str(e.value) == (
        "weights/typo: no such checkpoint folder; weights/ holds opt-kjv-wiki/ (read as a local path because "
        "./weights/ exists; a Hub id is ORG/NAME with no such folder here)"
    )
    assert hub.calls == []

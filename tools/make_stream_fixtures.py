"""Write two pytorch_model.bin layouts of the opt-hub-bin fixture for tests/test_stream.py and tests/test_hub.py:

- opt-bin-shared: every tensor a view of ONE storage, as a model saved from a flat parameter buffer is. It loads
  whole, but `stream.py` refuses to stream it (each block would read the whole storage) and says so in one line.
- opt-bin-sharded: the state dict in three shards plus pytorch_model.bin.index.json, as the Hub's large OPT
  checkpoints are stored (streamed shard by shard, converted to safetensors shard by shard).

Dev-only: needs torch, which the package and its tests never import. Re-runnable and deterministic.

    python tools/make_stream_fixtures.py      # with a Python that has torch
"""

import json
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def shared(state, out):
    flat = torch.cat([t.reshape(-1) for t in state.values()])  # one buffer, every tensor a view of it
    views, offset = {}, 0
    for name, t in state.items():
        views[name] = flat[offset : offset + t.numel()].view(t.shape)
        offset += t.numel()
    torch.save(views, out / "pytorch_model.bin")
    back = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert len({t.untyped_storage().data_ptr() for t in back.values()}) == 1  # really one storage
    assert all(torch.equal(back[n], state[n]) for n in state)


def sharded(state, out, n=3):
    names = list(state)
    weight_map = {}
    for k in range(n):
        shard = f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin"
        part = {name: state[name].clone() for name in names[k::n]}  # clone: each shard its own storages
        torch.save(part, out / shard)
        weight_map.update({name: shard for name in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def main():
    src = FIXTURES / "opt-hub-bin"
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    for name, write in (("opt-bin-shared", shared), ("opt-bin-sharded", sharded)):
        out = FIXTURES / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        shutil.copy(src / "config.json", out / "config.json")
        write(state, out)
        print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main()

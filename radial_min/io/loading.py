"""`load(source)`: a checkpoint folder or Hub id -> an OPT, ViT, Llama or Qwen2 model, checked tensor by tensor.

Every tensor name and shape is checked against what the config implies *before* any data is read, so a
checkpoint that does not match its config fails with one message listing all that is wrong, never half-loaded.
"""

import time
from collections import Counter
from pathlib import Path

import numpy as np

from .. import kernels
from ..models import ARCHITECTURES, llama, parse_config, read_config
from .checkpoint import open_checkpoint, quote
from ..dtypes import check_storage_dtype, to_storage
from ..errors import CheckpointError, SettingError, count
from ..generation import read_generation_defaults
from .gguf_file import GGUFStore, Renamed, config_dict, field, is_gguf, open_reader
from .hub import resolve
from ..analysis.memory import drop_pages
from ..cache import KV_DTYPES
from ..radial import RADIAL_CONFIG, load_radial


def load(source, *, weights_dtype: str | None = None, kv_dtype: str = "float32"):
    """Load a model from a local folder (config.json + weights), a .gguf file, or a Hub id such as "facebook/opt-125m".
    A folder with a radial.json (a network trained with its router, `cli.py train --radial`) loads as the routed
    `RadialNetwork`.

    `weights_dtype` (default: "native" for a .gguf file, "float32" otherwise): "native" keeps every weight matrix
    as the file stores it: a GGUF's Q4_0, Q4_1, Q4_K, Q8_0 and Q6_K blocks stay quantized (quant.BlockMatrix; other
    quantized types are widened to float32), float16 and bfloat16 stay half precision. "float16" or "bfloat16"
    keeps the matrices in half precision (half the memory; decode ~1.5x faster at OPT-125M), "int8" in 8 bits with
    a float32 scale per row (a quarter; see dtypes.Int8Matrix); everything is still computed in float32.

    `kv_dtype` "float16" keeps the keys and values of generation's KV cache in half precision (cache.py; llama.cpp's
    default): half its memory, each entry rounded to float16 once."""
    t0 = time.perf_counter()
    if kv_dtype not in KV_DTYPES:
        raise SettingError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    gguf = is_gguf(source)  # a single llama.cpp file (optional `gguf` package), else a Hugging Face folder
    weights_dtype = weights_dtype or ("native" if gguf else "float32")
    check_storage_dtype(weights_dtype)  # refuse an unknown dtype before reading anything
    path, cfg, store, names = open_gguf(source) if gguf else open_checkpoint_folder(source)
    check_quantizable(store, names, weights_dtype)
    tensors = {}
    for ours, theirs in names.items():  # one tensor at a time, narrowed as read: peak memory = model + one tensor
        tensors[ours] = read_stored(store, ours, theirs, weights_dtype)
    model = ARCHITECTURES[cfg.model_type].model(
        cfg,
        tensors,
        path=path,
        weights_dtype=weights_dtype,
        dtypes_on_disk=Counter(store.dtype(theirs) for theirs in names.values()),
        file_type=field(store.reader, "general.file_type") if gguf else None,  # llama.cpp's quantization mix
        generation_defaults={} if gguf else read_generation_defaults(path),
        load_seconds=time.perf_counter() - t0,  # the reading: building the blocks takes a fraction of it
    )
    model.kv_dtype = kv_dtype
    kernels.start()
    if not gguf and (Path(path) / RADIAL_CONFIG).is_file():  # a network co-trained with its router: routed
        model = load_radial(model, path)
    return model


def loading_line(model, seconds: float | None = None) -> str:
    """One line for a load worth mentioning: 'loaded NAME (134.5M parameters, Q4_1 -> float32) in 4.0 s'. `seconds`
    defaults to the load's own time; a caller that also read the tokenizer passes the sum."""
    seconds = model.load_seconds if seconds is None else seconds
    n = model.n_params
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
    on_disk = "/".join(sorted(model.dtypes_on_disk, key=lambda d: -model.dtypes_on_disk[d])[:2])
    stored = model.weights_dtype if on_disk == model.weights_dtype else f"{on_disk} -> {model.weights_dtype}"
    return f"loaded {Path(model.path).name} ({size} parameters, {stored}) in {seconds:.1f} s"


_NATIVE = {"float16": "float16", "F16": "float16", "bfloat16": "bfloat16", "BF16": "bfloat16"}  # else float32


def read_stored(store, ours, theirs, weights_dtype):
    """One tensor as the model keeps it: a weight matrix in the storage dtype (native: a GGUF block format stays
    quantized, its pages handed back to the page cache once decoded), anything else float32."""
    if weights_dtype == "native" and isinstance(store, GGUFStore):
        blocks = store.read_blocks(theirs)
        if blocks is not None:
            drop_pages(store.reader.data)  # the decoded copy is all we keep: peak memory = model + one tensor
            if not blocks.finite():
                raise CheckpointError(f"{store.description}: tensor {quote(theirs)} has NaN or infinite scales")
            return blocks
    a = read_checked(store, theirs)
    if not _is_matrix(ours, a.ndim):
        return a
    dtype = _NATIVE.get(store.dtype(theirs), "float32") if weights_dtype == "native" else weights_dtype
    return to_storage(a, dtype)


def open_checkpoint_folder(source):
    """(folder, config, store, names): a checkpoint folder (or Hub id) opened and every tensor name and shape checked
    against its config, nothing read yet; `names` maps our tensor names to the checkpoint's."""
    folder = resolve(source)
    cfg = read_config(folder)
    store = open_checkpoint(folder)
    return folder, cfg, store, _match(store, cfg, ARCHITECTURES[cfg.model_type].module)


def open_gguf(path):
    """(path, config, store, names): a .gguf file opened and its tensors checked against the config from its
    metadata, nothing dequantized yet; `names` maps transformers' tensor names to the file's."""
    reader = open_reader(path)
    cfg = parse_config(config_dict(reader), f"{path} (metadata)")
    store = GGUFStore(reader, cfg.num_attention_heads, cfg.num_key_value_heads, permuted=cfg.model_type == "llama")
    renamed = Renamed(store)
    return path, cfg, store, {ours: renamed.gguf[theirs] for ours, theirs in _match(renamed, cfg, llama).items()}


def read_checked(store, theirs) -> np.ndarray:
    """One tensor, read and refused if it holds NaN or infinite values."""
    a = store.read(theirs)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = int(a.size - np.isfinite(a).sum())
        raise CheckpointError(
            f"{store.description}: tensor {quote(theirs)} has {count(bad, 'NaN or infinite value')} of {a.size}"
        )
    return a


def _is_matrix(name, ndim: int) -> bool:
    """Weights that go through a matmul (or the tied embedding/LM head); norms, biases and positions stay float32."""
    return ndim >= 2 and name.endswith(".weight") and "position" not in name


def check_quantizable(store, names: dict, weights_dtype: str) -> None:
    """int8 quantizes [out, in] matrices row by row: refuse, before anything is read, a checkpoint whose weight
    matrices are not all 2-D (a ViT's patch embedding is a 4-D convolution kernel)."""
    if weights_dtype != "int8":
        return
    for ours, theirs in names.items():
        shape = tuple(store.shape(theirs))
        if _is_matrix(ours, len(shape)) and len(shape) != 2:
            raise SettingError(
                f"{store.description}: weights_dtype int8 quantizes 2-D [out, in] matrices row by row, "
                f"but tensor {_safe(theirs)} is {len(shape)}-D {list(shape)}; use float32, float16 or "
                "bfloat16 for this checkpoint"
            )


def _match(store, cfg, module) -> dict:
    """Map our tensor names to the checkpoint's, or raise one error naming every problem."""
    required, optional, unused = module.expected_tensors(cfg)
    expected = {**unused, **optional, **required}
    found = {}
    for theirs in store.names():
        ours = module.normalize_name(theirs)
        if ours in found:
            raise CheckpointError(
                f"{store.description}: tensors {quote(found[ours])} and {quote(theirs)} are the same tensor twice"
            )
        found[ours] = theirs
    missing = [_safe(n) for n in required if n not in found]
    unexpected = [_safe(theirs) for ours, theirs in found.items() if ours not in expected]
    shapes = [
        f"{_safe(theirs)} is {list(store.shape(theirs))}, expected {list(expected[ours])}"
        for ours, theirs in found.items()
        if ours in expected and tuple(store.shape(theirs)) != tuple(expected[ours])
    ]
    floats = _FLOATS | getattr(store, "float_types", set())  # a GGUF store adds its quantized types
    not_float = [
        _safe(theirs) for ours, theirs in found.items() if ours in expected and store.dtype(theirs) not in floats
    ]
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", shapes),
        ("not a float tensor", not_float),
    ):
        if items:
            shown = "; ".join(items[:4]) + (f"; and {len(items) - 4} more" if len(items) > 4 else "")
            problems.append(f"{label}: {shown}")
    pairs = [p for p in ("pooler.dense.weight", "pooler.dense.bias") if p in found]
    if len(pairs) == 1:
        problems.append(f"pooler: {_safe(found[pairs[0]])} present without its partner")
    if problems:
        head = f"{store.description} does not match its config.json ({cfg.model_type}): "
        raise CheckpointError(head + " | ".join(problems))
    return {ours: theirs for ours, theirs in found.items() if ours in required or ours in optional}


def _safe(name: str) -> str:
    """A name as is if it is plain printable text, else quoted (escapes newlines and terminal control codes)."""
    return name if name.isprintable() else quote(name)


_FLOATS = {"float32", "float16", "bfloat16", "float64"}

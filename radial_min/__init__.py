"""radial_min: a small NumPy + Numba engine for Radial Networks (Dotzel et al., 2024).

import radial_min
model = radial_min.load("weights/opt-kjv-wiki")           # or a Hub id such as "facebook/opt-125m"
tok = radial_min.Tokenizer("weights/opt-kjv-wiki")
ids = radial_min.generate(model, tok.encode("In the beginning"), max_new_tokens=20)
print(tok.decode(ids))
"""

from .errors import CheckpointError, RadialError
from .generation import generate
from .io.loading import load
from .io.tokenizer import Tokenizer

__all__ = ["load", "generate", "Tokenizer", "RadialError", "CheckpointError"]
__version__ = "0.1.0"

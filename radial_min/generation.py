"""Autoregressive generation: prefill the prompt into a KV cache, then one token at a time.

Sampling follows transformers' order: temperature, then top-k, then top-p (nucleus), then a draw. At
temperature 0 it is greedy (argmax, first index on ties, as torch.argmax).
"""

import numpy as np

from .errors import SettingError


def sample(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, rng=None) -> int:
    """Pick the next token from one row of logits [V]."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    top = z.max()  # the largest logit subtracted first: at a tiny temperature, z / T would overflow to inf - inf
    with np.errstate(over="ignore"):  # a tiny temperature: the other logits go to -inf, probability 0
        z = (z - top) / temperature if np.isfinite(top) else np.where(z == top, 0.0, -np.inf)
    if top_k is not None and 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = cum - p[order] < top_p  # the smallest prefix whose mass reaches top_p (always >= 1 token)
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.choice(p.size, p=p))


def penalize_repeats(logits, seen, penalty: float):
    """transformers' repetition penalty (Keskar et al., 2019): the logit of every token already in the text is
    divided by `penalty` if positive, multiplied if negative, so repeats become less likely. Returns a copy."""
    out = logits.copy()
    seen = np.unique(seen)
    out[seen] = np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out


def check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty=1.0):
    """Refuse sampling settings that have no meaning, naming the argument. An infinite temperature (or 1e309, which
    is one) would make every token equally likely, an infinite penalty every seen token impossible: refused."""
    if not 0 < repetition_penalty < np.inf:  # also refuses NaN
        raise SettingError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty}")
    if max_new_tokens < 0:
        raise SettingError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0 <= temperature < np.inf:
        raise SettingError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise SettingError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise SettingError(f"top_p must be in (0, 1], got {top_p}")


def generate(
    model,
    input_ids,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    on_token=None,
    stop_at_eos: bool = True,
    observe=None,
    repetition_penalty: float = 1.0,
) -> np.ndarray:
    """The new token ids after `input_ids` (the EOS that ended them included), [n] int64.

    `on_token(id)` is called for each new token as it is chosen (streaming); `observe` is passed on to
    `model.forward` (profiling); `repetition_penalty` > 1 discourages tokens already in the text (1 = off).
    Generation stops at EOS, after `max_new_tokens`, or when the model's position table is full.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    rng = np.random.default_rng(seed)
    # the last new token is never fed back, so it may sit one past the position table's end
    n_max = max(0, min(max_new_tokens, model.config.max_position_embeddings - len(input_ids) + 1))
    new = []
    if max_new_tokens == 0:
        return np.zeros(0, np.int64)
    cache = model.new_cache()
    logits = model.forward(input_ids, cache, last_only=True, observe=observe)[0]  # prefill: [T] -> [V]
    while True:
        if repetition_penalty != 1.0:
            logits = penalize_repeats(logits, np.concatenate([input_ids, new]).astype(np.int64), repetition_penalty)
        token = sample(logits, temperature, top_k, top_p, rng)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if (stop_at_eos and token == model.config.eos_token_id) or len(new) == n_max:
            return np.array(new, dtype=np.int64)
        logits = model.forward(np.array([token]), cache, last_only=True, observe=observe)[0]  # decode: [1] -> [V]

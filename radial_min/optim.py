"""AdamW (Loshchilov & Hutter) over a dict of named parameters, global-norm clipping, and the learning-rate
schedule (linear warm-up, cosine decay): the optimizer of train.py and of the router's trainer."""

import math

import numpy as np

from .errors import RadialError, count


def adamw_step(params, grads, m, v, step, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1):
    """AdamW (Loshchilov & Hutter): Adam's update plus decay applied to matrices only, not to norms or biases."""
    for name, g in grads.items():
        m[name] = beta1 * m[name] + (1 - beta1) * g
        v[name] = beta2 * v[name] + (1 - beta2) * g * g
        m_hat = m[name] / (1 - beta1**step)
        v_hat = v[name] / (1 - beta2**step)
        p = params[name]
        if p.ndim == 2:
            p -= lr * weight_decay * p
        p -= (lr * m_hat / (np.sqrt(v_hat) + eps)).astype(p.dtype)


def clip_grads(grads, max_norm):
    """Scale all gradients together so their global L2 norm is at most `max_norm`; return the norm before."""
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    if max_norm > 0 and norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


def lr_at(step, max_lr, warmup, total, min_ratio=0.1):
    """Linear warm-up to `max_lr`, then cosine decay to `min_ratio * max_lr` at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def check_state(params: dict, m: dict, v: dict, source) -> None:
    """A saved training state fit to resume: every parameter and first moment finite, every second moment finite and
    >= 0 (a running mean of squares: a negative one makes sqrt(v) NaN at the next step, and a NaN anywhere spreads
    to every weight, so the run would go on to `loss nan` and exit 0). One error naming the file and the tensor."""
    for prefix, tensors in (("", params), ("adam.m.", m), ("adam.v.", v)):
        for name, a in tensors.items():
            bad = int(a.size - np.isfinite(a).sum())
            if bad:
                raise RadialError(
                    f"{source}: tensor {prefix + name!r} has {count(bad, 'NaN or infinite value')}: the run "
                    "diverged before this save, or the file is damaged; resume from a good copy or use a new --out"
                )
            if prefix == "adam.v." and (a < 0).any():
                raise RadialError(
                    f"{source}: tensor {prefix + name!r} has negative values, but Adam's second moment is a mean "
                    "of squares: the file is damaged; resume from a good copy or use a new --out"
                )

"""Autoregressive generation: prefill the prompt into a KV cache, then one token at a time.

Each step follows transformers' order: the penalties change the logits (repetition, then presence and
frequency), then temperature, top-k, top-p (nucleus) and min-p shape the distribution, then a draw. At
temperature 0 it is greedy (argmax, first index on ties, as torch.argmax). Generation ends at an end token (EOS
and any `stop_ids`, such as a chat template's end of turn), when `stop` says so (stop strings: StopStrings),
after `max_new_tokens`, or when the position table is full.
"""

from pathlib import Path

import numpy as np

from .errors import CheckpointError, SettingError
from .io.outputs import present, read_json

# The repetition penalty when neither the caller nor the model says otherwise: off, as in transformers and
# llama.cpp. A model's folder may set its own in generation_config.json (transformers' file for a model's
# generation defaults); the shipped models set 1.2, without which their greedy text loops ("of the city of ...").
# `generate` and the CLI both take their default from `default_repetition_penalty`, so they agree.
REPETITION_PENALTY = 1.0
GENERATION_CONFIG = "generation_config.json"


def sample(
    logits,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng=None,
    min_p: float | None = None,
) -> int:
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
    if min_p is not None and min_p > 0.0:
        p = keep_min_p(p, min_p)
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.choice(p.size, p=p))


def keep_min_p(p, min_p: float):
    """Min-p sampling (Nguyen et al., 2024; transformers' MinPLogitsWarper, llama.cpp's --min-p): keep the tokens
    whose probability is at least `min_p` times the most likely one's, renormalized. The threshold scales with the
    model's confidence: a peaked distribution keeps few tokens, a flat one many. The argmax always stays."""
    p = np.where(p >= min_p * p.max(), p, 0.0)  # [V]
    return p / p.sum()


def penalize_counts(logits, generated, presence: float, frequency: float):
    """Presence and frequency penalties (OpenAI's API; llama.cpp's --presence-penalty/--frequency-penalty):
    logit[t] -= presence * (count[t] > 0) + frequency * count[t], where count[t] is how often token t was generated
    so far (the prompt is not counted, as in OpenAI's and vLLM's definition; llama.cpp counts its last 64 tokens,
    prompt included). Presence discourages any repeat once; frequency more with every repeat. Returns a copy."""
    out = logits.astype(np.float32)  # [V], a copy
    tokens, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)  # the tokens with count > 0
    out[tokens] -= presence + frequency * counts
    return out


def penalize_repeats(logits, seen, penalty: float):
    """transformers' repetition penalty (Keskar et al., 2019): the logit of every token already in the text is
    divided by `penalty` if positive, multiplied if negative, so repeats become less likely. Returns a copy."""
    out = logits.copy()
    seen = np.unique(seen)
    out[seen] = np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out


def default_repetition_penalty(model) -> float:
    """The model's own default (its folder's generation_config.json, read by `load`), else REPETITION_PENALTY. A
    routed network (radial.RadialNetwork) has the default of the model it routes."""
    for m in (model, getattr(model, "model", None)):
        penalty = getattr(m, "generation_defaults", {}).get("repetition_penalty")
        if penalty is not None:
            return penalty
    return REPETITION_PENALTY


def read_generation_defaults(folder) -> dict:
    """From a checkpoint folder's generation_config.json, the defaults `generate` takes from a model: its
    repetition_penalty (the other fields, such as sampling settings, are left to the caller). {} without the file."""
    path = Path(folder) / GENERATION_CONFIG
    if not present(path, CheckpointError):
        return {}
    penalty = read_json(path, CheckpointError, "a JSON object of generation settings").get("repetition_penalty")
    if penalty is None:
        return {}
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 < penalty < 1e6:
        raise CheckpointError(f"{path}: repetition_penalty is {penalty!r:.40}, expected a number > 0")
    return {"repetition_penalty": float(penalty)}


def check_sampling(
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    repetition_penalty=1.0,
    min_p=None,
    presence_penalty=0.0,
    frequency_penalty=0.0,
):
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
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise SettingError(f"min_p must be in [0, 1], got {min_p}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not abs(value) <= 1e6:  # also refuses NaN; negative values encourage repeats, as in OpenAI's API
            raise SettingError(f"{name} must be a finite number, got {value}")


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
    repetition_penalty: float | None = None,
    min_p: float | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    stop_ids=(),
    stop=None,
    cache=None,
    cached: int = 0,
) -> np.ndarray:
    """The new token ids after `input_ids` (the end token or stop that ended them included), [n] int64.

    `on_token(id)` is called for each new token as it is chosen (streaming); `observe` is passed on to
    `model.forward` (profiling); `repetition_penalty` > 1 discourages tokens already in the text (1 = off; None =
    the model's default, `default_repetition_penalty`); `presence_penalty`/`frequency_penalty` discourage tokens
    already generated, once or per repeat; `min_p` keeps the tokens at least that share as likely as the best.
    Generation stops at EOS (unless `stop_at_eos` is False) or another of `stop_ids`, when `stop(id)` returns
    True (StopStrings), after `max_new_tokens`, or when the model's position table is full.

    `cache` continues a KV cache that already holds the first `cached` tokens of `input_ids` (a conversation's
    earlier turns): only the rest is fed. The penalties still see all of `input_ids`. Afterwards the cache holds
    `input_ids` and every new token but the last.
    """
    if repetition_penalty is None:
        repetition_penalty = default_repetition_penalty(model)
    check_sampling(
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, min_p, presence_penalty, frequency_penalty
    )
    rng = np.random.default_rng(seed)
    # the last new token is never fed back, so it may sit one past the position table's end
    n_max = max(0, min(max_new_tokens, model.config.max_position_embeddings - len(input_ids) + 1))
    ends = {int(t) for t in stop_ids} | ({model.config.eos_token_id} if stop_at_eos else set())
    new = []
    if max_new_tokens == 0:
        return np.zeros(0, np.int64)
    if len(input_ids) == 0:
        raise SettingError("input_ids is empty: generation starts from at least one token (such as BOS)")
    if cache is None:
        cache, cached = model.new_cache(), 0
    if not 0 <= cached < len(input_ids):
        raise SettingError(f"cached must leave at least one of the {len(input_ids)} input ids to feed, got {cached}")
    feed = np.asarray(input_ids[cached:], np.int64)
    logits = model.forward(feed, cache, last_only=True, observe=observe)[0]  # prefill: [T] -> [V]
    while True:
        if repetition_penalty != 1.0:
            logits = penalize_repeats(logits, np.concatenate([input_ids, new]).astype(np.int64), repetition_penalty)
        if new and (presence_penalty or frequency_penalty):
            logits = penalize_counts(logits, new, presence_penalty, frequency_penalty)
        token = sample(logits, temperature, top_k, top_p, rng, min_p)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token in ends or (stop is not None and stop(token)) or len(new) == n_max:
            return np.array(new, dtype=np.int64)
        logits = model.forward(np.array([token]), cache, last_only=True, observe=observe)[0]  # decode: [1] -> [V]


class StopStrings:
    """Stop strings (transformers' `stop_strings`, llama.cpp's `stop`): `stop(token)` for `generate`, True once
    the text generated so far contains one of `strings`. The text is decoded from all the new tokens, so a stop
    string split across tokens, or inside one, is found; `text` is what came before the first stop string (it is
    not part of the answer, as in OpenAI's and llama.cpp server's output)."""

    def __init__(self, tokenizer, strings):
        self.tokenizer, self.strings, self.ids = tokenizer, [s for s in strings if s], []
        self.found = None  # the stop string that ended generation, if one did

    def __call__(self, token: int) -> bool:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        hits = [(text.find(s), s) for s in self.strings if s in text]
        if hits:
            self.found = min(hits)[1]
        return self.found is not None

    def cut(self, text: str) -> int:
        """Where the first stop string in `text` starts (len(text) if there is none)."""
        return min((text.find(s) for s in self.strings if s in text), default=len(text))

    @property
    def text(self) -> str:
        """The new text up to the first stop string (all of it if none was found)."""
        text = self.tokenizer.decode(self.ids)
        return text[: self.cut(text)]

    def safe_length(self, text: str) -> int:
        """How much of `text` (the new text so far) can be shown now: everything before the first stop string if
        there is one, else all but the longest tail that could still grow into one (a streamer holds it back)."""
        cut = self.cut(text)
        if cut < len(text):
            return cut
        hold = 0
        for s in self.strings:
            hold = max([hold] + [k for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])])
        return len(text) - hold

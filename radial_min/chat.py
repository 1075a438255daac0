"""Chat with an instruct model: the conversation rendered by the model's own chat template, one turn at a time.

An instruct model (SmolLM2-Instruct, Llama-3-Instruct, Qwen2-Instruct, ...) was fine-tuned on conversations
written in a fixed format, such as ChatML's `<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n`. Given
plain text it often ends its answer at once. The format ships with the model as a Jinja template (a GGUF file's
`tokenizer.chat_template`, a folder's `tokenizer_config.json` "chat_template" or `chat_template.jinja`), and
transformers renders it with jinja2 in a sandbox; so do we (jinja2 is the optional `chat` extra), with the same
environment (`trim_blocks`, `lstrip_blocks`, `raise_exception`, `tojson`, `strftime_now`) and variables
(`messages` as [{"role", "content"}], `add_generation_prompt`, `bos_token`, `eos_token`).

    chat = Chat(model, tokenizer, ChatTemplate.of(model.path, tokenizer), system="Answer briefly.")
    chat.reply("What is the capital of France?", on_text=print)   # streamed; the answer is also returned

A turn ends at the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`: found by rendering
a conversation, `end_of_turn`), at EOS, at a stop string, or after `max_new_tokens`. The KV cache is kept across
turns: when the ids it holds begin the next turn's rendering, only the new part is fed.
"""

import json
from datetime import datetime
from pathlib import Path

import numpy as np

from .errors import CheckpointError, RadialError, count
from .generation import StopStrings, generate
from .io.gguf_file import field, is_gguf, open_reader
from .io.tokenizer import Streamer

JINJA_NOTE = 'chat templates are rendered with jinja2, an optional extra: pip install -e ".[chat]"'
_SENTINEL = "radial-min-sentinel-7f3a"  # a text no template adds: what follows it in a rendering ends a turn


def find_template(source):
    """(template text, where it came from) of a .gguf file or a checkpoint folder, or None if it has none."""
    if is_gguf(source):
        text, where = field(open_reader(source), "tokenizer.chat_template"), f"{source} (tokenizer.chat_template)"
    else:
        folder = Path(source)
        jinja, config = folder / "chat_template.jinja", folder / "tokenizer_config.json"
        if jinja.is_file():  # where transformers >= 4.43 saves it
            text, where = _read(jinja), str(jinja)
        elif config.is_file():
            text, where = _from_config(config), f"{config} (chat_template)"
        else:
            return None
    if text is None:
        return None
    if not isinstance(text, str):
        raise CheckpointError(f"{where}: expected a template (a string), got {type(text).__name__}")
    return text, where


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _from_config(path: Path):
    """tokenizer_config.json's "chat_template": a string, or a list of {"name", "template"} (the "default" one)."""
    try:
        d = json.loads(_read(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    t = d.get("chat_template") if isinstance(d, dict) else None
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        if "default" not in named:
            raise CheckpointError(f"{path}: chat_template lists templates {sorted(map(str, named))}, none 'default'")
        t = named["default"]
    return t


def compile_template(text: str, where: str):
    """The template compiled as transformers compiles it (its `_compile_jinja_template`): an immutable sandbox
    (a template cannot reach Python objects or change the messages), block tags that leave no stray newlines or
    indentation, `raise_exception(msg)` for templates that refuse a conversation, `tojson` without HTML escaping,
    `strftime_now(fmt)` for templates that print today's date, and `break`/`continue` in loops."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise RadialError(f"{where}: {JINJA_NOTE}") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"{where}: not a valid Jinja template (line {e.lineno}: {e.message})") from None


class ChatTemplate:
    """A model's chat template, compiled, with the special tokens it may print (`bos_token`, `eos_token`)."""

    def __init__(self, text: str, where: str, special: dict | None = None):
        self.text, self.where, self.special = text, where, dict(special or {})
        self.compiled = compile_template(text, where)

    @classmethod
    def of(cls, source, tokenizer):
        """The template of a .gguf file or a checkpoint folder (None if it has none), with the tokenizer's special
        tokens as the template sees them."""
        found = find_template(source)
        if found is None:
            return None
        special = {
            name: tokenizer.backend.id_to_token(i)
            for name, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id))
            if i is not None
        }
        return cls(*found, special)

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        """The conversation as the model reads it; with `add_generation_prompt`, ending where its answer starts."""
        import jinja2

        try:
            return self.compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special,
            )
        except jinja2.exceptions.TemplateError as e:  # raise_exception, an undefined name, a bad filter argument
            raise RadialError(f"{self.where}: the template refused the conversation: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise RadialError(
                f"{self.where}: the template failed on the conversation ({type(e).__name__}: {e})"
            ) from None

    def end_of_turn(self) -> str | None:
        """The text the template writes after an assistant's message (`<|im_end|>`, `<|eot_id|>`, `</s>`), found
        by rendering a short conversation; None if it writes nothing there or refuses the probe."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = self.render(probe, add_generation_prompt=False)
        except RadialError:
            return None
        after = text[text.rfind(_SENTINEL) + len(_SENTINEL) :] if _SENTINEL in text else ""
        return after.split()[0] if after.strip() else None


def stop_ids(template: ChatTemplate | None, tokenizer, model) -> tuple[list[int], list[str]]:
    """(token ids, strings) that end an answer: EOS (the model's and the tokenizer's), a GGUF file's end-of-turn
    token, and the template's end of turn (an id if it is one token of the vocabulary, else a stop string)."""
    ids = {model.config.eos_token_id, tokenizer.eos_id}
    if is_gguf(model.path):
        ids.add(field(open_reader(model.path), "tokenizer.ggml.eot_token_id"))
    strings = []
    end = template.end_of_turn() if template is not None else None
    if end is not None:
        i = tokenizer.backend.token_to_id(end)
        (ids.add(i) if i is not None else strings.append(end))
    return sorted(i for i in ids if i is not None), strings


def encode(tokenizer, text: str) -> np.ndarray:
    """A rendered conversation's ids: the template writes BOS itself if the model wants one (transformers adds
    nothing); a tokenizer that prepends BOS gets it only if the text does not already start with it (llama.cpp)."""
    bos = tokenizer.backend.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None
    return tokenizer.encode(text, bos=tokenizer.add_bos and bos is not None and not text.startswith(bos))


class Chat:
    """A conversation with a model: its messages, and the ids of what the KV cache holds.

    `settings` are `generate`'s (max_new_tokens, temperature, top_k, top_p, min_p, the penalties, seed); `stop`
    adds stop strings to the template's end of turn."""

    def __init__(self, model, tokenizer, template: ChatTemplate, system: str | None = None, stop=(), **settings):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.messages = [] if system is None else [{"role": "system", "content": system}]
        self.end_ids, strings = stop_ids(template, tokenizer, model)
        self.stop_strings = [*strings, *stop]
        self.settings = {"max_new_tokens": 512, **settings}
        self.cache, self.in_cache = None, np.zeros(0, np.int64)  # the KV cache and the ids it holds

    def prompt(self, user: str) -> np.ndarray:
        """The ids of the conversation with `user`'s message added, ending where the answer starts."""
        text = self.template.render([*self.messages, {"role": "user", "content": user}], add_generation_prompt=True)
        return encode(self.tokenizer, text)

    def reply(self, user: str, on_text=None) -> str:
        """Add `user`'s message, generate the answer (its text streamed to `on_text`), add it; return it."""
        ids = self.prompt(user)
        context = self.model.config.max_position_embeddings
        if len(ids) >= context:
            raise RadialError(
                f"the conversation is {count(len(ids), 'token')} long, the model's context is {context}: "
                "start a new chat, or shorten the system prompt"
            )
        n = len(self.in_cache)
        reuse = self.cache is not None and 0 < n < len(ids) and np.array_equal(ids[:n], self.in_cache)
        if not reuse:
            self.cache, n = self.model.new_cache(), 0
        stops = StopStrings(self.tokenizer, self.stop_strings)
        streamer = Streamer(self.tokenizer, on_text or (lambda text: None), stops)
        self.in_cache = None  # unknown until the answer is complete (an interrupt leaves the cache part-filled)
        new = generate(
            self.model,
            ids,
            on_token=streamer,
            stop_ids=self.end_ids,
            stop=stops if self.stop_strings else None,
            cache=self.cache,
            cached=n,
            **self.settings,
        )
        streamer.finish()
        self.in_cache = np.concatenate([ids, new[:-1]])
        answer = stops.text if self.stop_strings else self.tokenizer.decode(new)
        self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer

    def interrupted(self):
        """After an answer was cut short (Ctrl-C): the cache is dropped (it may hold part of a token's keys), and the
        user's message is kept with no answer."""
        self.cache, self.in_cache = None, np.zeros(0, np.int64)


def instruct_notice(source, new_ids, tokenizer, model) -> str | None:
    """The warning for a plain prompt that an instruct model answered with an end token at once: it has a chat
    template, and without it the model sees text it was not fine-tuned on."""
    if len(new_ids) == 0 or int(new_ids[0]) not in {model.config.eos_token_id, tokenizer.eos_id}:
        return None
    try:
        found = find_template(source)
    except RadialError:
        found = None
    if found is None:
        return None
    return (
        f"{Path(str(source)).name} ended its answer at once: it has a chat template ({found[1]}), so it is an "
        "instruct model that expects a conversation; try generate --chat, or the chat command"
    )

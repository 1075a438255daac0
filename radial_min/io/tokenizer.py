"""OPT's tokenizer: GPT-2's byte-level BPE (vocab.json + merges.txt) through the `tokenizers` library.

OPT numbers the vocabulary the fairseq way (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3) and prepends `</s>` as BOS,
so "Hello world" is [2, 31414, 232]. Special tokens named in the folder's config are matched whole in text.
"""

import os
import re
import tempfile
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import CheckpointError, count
from .gguf_file import read_tokenizer
from .outputs import present, read_json, write_json, write_text

MAX_FILE_BYTES = 1 << 28  # a tokenizer.json, vocab.json or merges.txt: the largest public ones are ~35 MB
CHUNK = 1 << 17  # characters tokenized at once: the library keeps ~750 bytes per token of the text it is given
WINDOW = 256  # characters each side of a place a long text is cut, over which the cut is checked
# where a text may be cut: the end of a word before whitespace, between a word and punctuation (each checked)
_BREAK = re.compile(r"(?<=\S)(?=\s)|(?<=\w)(?=[^\w\s])|(?<=[^\w\s])(?=\w)")


class Tokenizer:
    def __init__(self, folder):
        if str(folder).lower().endswith(".gguf"):  # a llama.cpp file carries its own tokenizer
            what = "its tokenizer.ggml.* metadata is not a usable tokenizer"
            self.backend, self.bos_id, self.eos_id, self.add_bos = _build(folder, lambda: read_tokenizer(folder), what)
            self.source = Path(folder)  # the file that numbers the vocabulary
            self.vocab_size = self.backend.get_vocab_size()
            return
        folder = Path(folder)
        settings = _special_tokens(folder / "tokenizer_config.json")
        special = _special_tokens(folder / "special_tokens_map.json")
        settings = {**special, **settings}
        vocab, merges, whole = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
        if _library_file(whole):
            self.backend, self.source = _build(whole, lambda: HFTokenizer.from_file(str(whole))), whole
            # transformers turns a file's truncation and padding off unless a call asks for them: so do we (a
            # truncation.max_length of 0 would silently drop every prompt)
            self.backend.no_truncation()
            self.backend.no_padding()
        elif all([_library_file(vocab), _library_file(merges)]):  # both checked: a FIFO of either is refused
            bpe = _build(f"{vocab} with merges.txt", lambda: models.BPE.from_file(str(vocab), str(merges)))
            self.source = vocab
            self.backend = HFTokenizer(bpe)
            self.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self.backend.decoder = decoders.ByteLevel()
        else:
            raise CheckpointError(f"{folder}: no tokenizer (expected tokenizer.json, or vocab.json and merges.txt)")
        _check_ids(self.backend, self.source)
        names = [_content(settings.get(k)) for k in SPECIAL]
        names = [n for n in dict.fromkeys(names) if n] or ["</s>", "<pad>"]
        self.backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
        self.bos_id = self._id(_content(settings.get("bos_token")) or "</s>", folder)
        self.eos_id = self._id(_content(settings.get("eos_token")) or "</s>", folder)
        self.add_bos = bool(settings.get("add_bos_token", True))
        self.vocab_size = self.backend.get_vocab_size()

    def _id(self, token, folder):
        i = self.backend.token_to_id(token)
        if i is None:
            raise CheckpointError(f"{folder}: special token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str, bos: bool | None = None, source=None) -> np.ndarray:
        """Token ids for `text` (read from `source`, named in errors), with BOS in front unless told otherwise: [T]
        int64. A long text is tokenized in pieces cut where the cut changes no token (see `_pieces`)."""
        ids = [np.array([self.bos_id] if (self.add_bos if bos is None else bos) else [], np.int64)]
        ids += [np.array(self._ids(piece), np.int64) for piece in self._pieces(text, source or "the text")]
        return np.concatenate(ids)

    def _ids(self, text: str) -> list:
        return _build(
            self.source, lambda: self.backend.encode(text, add_special_tokens=False).ids, "failed on the text"
        )

    def _pieces(self, text: str, source):
        """`text` in pieces of at most CHUNK characters, so the library's memory is bounded by a piece, not the text.
        A piece ends at a break between words where tokenizing the WINDOW characters each side together gives the
        same tokens as tokenizing them apart, so the ids are those of the whole text. A run of CHUNK / 2 characters
        with no break at all (one enormous "word", which byte-level BPE would take whole, gigabytes later) is
        refused; if no break passes the check (a tokenizer whose normalizer prepends a marker to every text), the
        rest is tokenized whole, as before."""
        start = 0
        while len(text) - start > CHUNK:
            lo, hi = start + CHUNK // 2, start + CHUNK
            cuts = _breaks(text, lo, hi)
            if not cuts:
                raise CheckpointError(
                    f"{source}: characters {lo:,} to {hi:,} hold no break between words (a space, a line break, "
                    f"punctuation): a word of over {count(CHUNK // 2, 'character')} is not text to tokenize"
                )
            cut = next((c for c in reversed(cuts[-16:]) if self._cuts_cleanly(text, c)), None)
            if cut is None:
                break
            yield text[start:cut]
            start = cut
        yield text[start:]

    def _cuts_cleanly(self, text: str, cut: int) -> bool:
        lo, hi = max(0, cut - WINDOW), min(len(text), cut + WINDOW)
        return self._ids(text[lo:hi]) == self._ids(text[lo:cut]) + self._ids(text[cut:hi])

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def save(self, folder):
        """This tokenizer as a Hugging Face folder reads it: tokenizer.json and tokenizer_config.json (its BOS and
        EOS, whether BOS is added). A fine-tuned model's export carries it (train --init-from)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "tokenizer.json", self.backend.to_str())
        token = self.backend.id_to_token
        settings = {"bos_token": token(self.bos_id), "eos_token": token(self.eos_id), "add_bos_token": self.add_bos}
        write_json(folder / "tokenizer_config.json", settings)


class Streamer:
    """Prints generated text as it comes. Byte-level BPE can split a character across tokens, so we decode
    everything so far and print only the new, complete part (held back while it ends in U+FFFD). With `stops`
    (generation.StopStrings), a tail that may become a stop string is held back too, and nothing from a stop string
    on is printed."""

    def __init__(self, tokenizer: Tokenizer, write, stops=None):
        self.tokenizer, self.write, self.stops, self.ids, self.shown = tokenizer, write, stops, [], 0

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes ('' while a character is still split)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        end = len(text) if self.stops is None else self.stops.safe_length(text)
        piece, self.shown = text[self.shown : end], max(self.shown, end)
        return piece

    def __call__(self, token_id: int):
        piece = self.push(token_id)
        if piece:
            self.write(piece)

    def finish(self) -> str:
        """Write (and return) what is still held back when generation ends: a character left incomplete, a text
        that really ends in U+FFFD, or a tail that did not become a stop string. Afterwards everything written
        equals `decode` of all the ids, up to the first stop string."""
        text = self.tokenizer.decode(self.ids)
        end = len(text) if self.stops is None else self.stops.cut(text)
        piece, self.shown = text[self.shown : end], max(self.shown, end)
        if piece:
            self.write(piece)
        return piece


def _build(path, make, what="not a usable tokenizer file"):
    """The `tokenizers` library raises a bare Exception on a malformed file, and a hostile one can make its Rust code
    panic (PanicException, a BaseException, after a backtrace on file descriptor 2): name the file instead, in one
    line, with the library's own report kept off the terminal."""
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                return make()
            finally:
                os.dup2(saved, 2)
    except (KeyboardInterrupt, SystemExit, MemoryError, CheckpointError):  # ours already name the file
        raise
    except BaseException as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: {what} ({reason})") from None
    finally:
        os.close(saved)


def _breaks(text: str, lo: int, hi: int) -> list:
    """Where text[lo:hi] may be cut (positions in `text`), in order."""
    return [m.start() for m in _BREAK.finditer(text, lo, hi)]


def _library_file(path: Path) -> bool:
    """Whether a file the tokenizers library will read is there: a regular file of at most MAX_FILE_BYTES (a FIFO or
    folder of that name is refused, not taken as absent)."""
    if not present(path, CheckpointError):
        return False
    if path.stat().st_size > MAX_FILE_BYTES:
        raise CheckpointError(f"{path}: over the {count(MAX_FILE_BYTES, 'byte')} a tokenizer file may hold")
    return True


def _check_ids(backend, source) -> None:
    """Every token of the vocabulary its own id: two tokens on one id (a vocab.json that repeats a number) would
    decode one of them as the other."""
    vocab = backend.get_vocab(with_added_tokens=False)
    if len(set(vocab.values())) != len(vocab):
        first = {}
        for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if i in first:
                raise CheckpointError(f"{source}: tokens {first[i]!r:.40} and {token!r:.40} both have id {i}")
            first[i] = token


def _read_json(path: Path) -> dict:
    return (
        read_json(path, CheckpointError, "a JSON object of tokenizer settings")
        if present(path, CheckpointError)
        else {}
    )


SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def _special_tokens(path: Path) -> dict:
    """A tokenizer settings file, its special tokens checked: each a string or {"content": string} (or null)."""
    d = _read_json(path)
    for key in SPECIAL:
        token = _content(d.get(key))
        if token is not None and not isinstance(token, str):
            shown = repr(d[key]) if len(repr(d[key])) <= 40 else repr(d[key])[:37] + "..."
            raise CheckpointError(f'{path}: {key} is {shown}, expected a token (a string or {{"content": string}})')
    if not isinstance(d.get("add_bos_token", True), bool):
        raise CheckpointError(f"{path}: add_bos_token is {d['add_bos_token']!r:.40}, expected true or false")
    return d


def _content(token) -> str | None:
    """Special tokens are written either as strings or as {"content": ...} objects."""
    return token.get("content") if isinstance(token, dict) else token

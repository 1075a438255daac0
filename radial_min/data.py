"""Text corpora from `../shared/data`, the training corpus and its tokenizer, and packing token streams into
fixed-length sequences.

The paper profiles on WikiText-2 "packed without padding at batch size 1": the whole text is tokenized as one
stream and cut into consecutive sequences of `seq_len` tokens, each starting a fresh context.
"""

import os
import re
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import RadialError
from .io.outputs import npy_header, present, write_json, write_npz
from .io.tokenizer import Tokenizer

SHARED = Path(os.environ.get("RADIAL_MIN_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
MIN_VOCAB = 260  # a byte-level BPE: 256 bytes + 4 special tokens
WIKITEXT_TEST = SHARED / "wikitext-2" / "test.txt"
WIKITEXT_VALID = SHARED / "wikitext-2" / "valid.txt"
KJV = SHARED / "kjv" / "kjv.txt"


def read_text(path) -> str:
    path = Path(path)
    if not present(path):  # a folder or FIFO is refused by name
        raise RadialError(f"{path}: no such text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RadialError(f"{path}: not UTF-8 text ({e})") from None


def kjv_chapters(path=KJV) -> list[str]:
    """The King James Bible as one string per chapter: its "Book N" heading line, then one verse per line with
    the verse number dropped (numbers are references, not text). Chapters are separated by blank lines."""
    chapters = []
    for block in re.split(r"\n\s*\n", read_text(path).strip()):
        heading, *verses = block.strip().splitlines()
        verses = [v.split(" ", 1)[1] if re.match(r"^\d+ ", v) else v for v in verses]
        chapters.append("\n".join([heading, *verses]) + "\n")
    return chapters


def split_kjv(chapters: list[str], every: int = 20):
    """Hold out every `every`-th chapter (5% by default), spread across all books, for validation."""
    train = [c for i, c in enumerate(chapters) if i % every != every - 1]
    held = [c for i, c in enumerate(chapters) if i % every == every - 1]
    return train, held


WIKITEXT_REPO = "Salesforce/wikitext"


def wikitext_fetch(split: str = "test", option: str = "--text") -> Path:
    """WikiText-2 from the Hub when `../shared/data` is not there (needs network, and pyarrow for parquet).
    Offline it fails at once with one line naming `option`, the way to pass a text file instead."""
    name = f"wikitext-2-v1/{split}-00000-of-00001.parquet"
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RadialError(
            f"WikiText-2 is not in {SHARED}; reading it from the Hub needs pyarrow (pip install "
            f"pyarrow), or pass {option} FILE"
        ) from None
    try:
        from huggingface_hub import snapshot_download  # one look-up, no retries: offline fails at once

        path = Path(snapshot_download(WIKITEXT_REPO, repo_type="dataset", allow_patterns=[name])) / name
    except Exception as e:  # offline, no access, ...: all end the same way for the user
        raise RadialError(
            f"WikiText-2 is not in {SHARED} (or $RADIAL_MIN_DATA) and fetching it from the Hub "
            f"failed ({type(e).__name__}); pass {option} FILE"
        ) from None
    out = path.with_suffix(".txt")
    out.write_text("".join(pq.read_table(path).column("text").to_pylist()), encoding="utf-8")
    return out


def default_text(split: str = "test", option: str = "--text") -> Path:
    """WikiText-2's `split` from `../shared/data`, else from the Hub; `option` is the user's way around both."""
    path = SHARED / "wikitext-2" / f"{split}.txt"
    return path if path.is_file() else wikitext_fetch(split, option)


def pack(tokens: np.ndarray, seq_len: int, max_sequences: int | None = None, source="text") -> np.ndarray:
    """Cut a token stream into consecutive, non-overlapping rows of `seq_len`; the ragged tail is dropped."""
    if seq_len < 1:
        raise RadialError(f"--seq-len must be >= 1, got {seq_len}")
    if max_sequences is not None and max_sequences < 1:
        raise RadialError(f"--max-sequences must be >= 1, got {max_sequences}")
    n = len(tokens) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise RadialError(
            f"{source}: {len(tokens)} token{'' if len(tokens) == 1 else 's'}, fewer than one sequence of "
            f"{seq_len} (--seq-len)"
        )
    return np.asarray(tokens[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


# --------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out_dir) -> None:
    """A byte-level BPE in OPT's layout: `<s>`, `<pad>`, `</s>`, `<unk>` as ids 0-3, vocab.json + merges.txt,
    and the tokenizer_config that makes `</s>` the BOS, as facebook/opt-* ship it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # written whole, then moved into place
        tok.model.save(tmp)  # vocab.json, merges.txt
        for name in ("vocab.json", "merges.txt"):
            os.replace(Path(tmp) / name, out_dir / name)
    special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    write_json(out_dir / "special_tokens_map.json", special)
    config = {
        **special,
        "add_bos_token": True,
        "add_prefix_space": False,
        "errors": "replace",
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": 1_000_000,
    }
    write_json(out_dir / "tokenizer_config.json", config)


# ------------------------------------------------------------------------------------------------ corpus


def _wikitext_articles(text: str) -> list[str]:
    """Split WikiText at its top-level headings (" = Title = ") into one string per article."""
    articles, current = [], []
    for line in text.splitlines(keepends=True):
        if re.match(r"^ = [^=].* = $", line.rstrip("\n")) and current:
            articles.append("".join(current))
            current = []
        current.append(line)
    if current:
        articles.append("".join(current))
    return [a for a in articles if a.strip()]


def default_corpus() -> tuple[list[str], dict]:
    """Training documents and validation documents of the default recipe.

    Train: the KJV with every 20th chapter held out, plus WikiText-2 valid.txt (the train split is not
    available here). The KJV gives volume and fluent text; WikiText-2 is there because the paper profiles on it,
    so the model must know its register for residual ratios on it to mean anything. Validate on the held-out
    KJV chapters and on WikiText-2 test.txt, which the profiling and routing experiments then use."""
    train_kjv, held_kjv = split_kjv(kjv_chapters())
    wiki_train = _wikitext_articles(read_text(WIKITEXT_VALID))
    wiki_test = _wikitext_articles(read_text(WIKITEXT_TEST))
    return train_kjv + wiki_train, {"kjv": held_kjv, "wiki": wiki_test}


def tokenize_documents(tokenizer, docs: list[str]) -> np.ndarray:
    """One stream: each document starts with BOS (`</s>`) if the tokenizer adds one, as OPT's pre-training packs
    documents."""
    ids = [tokenizer.encode(d) for d in docs]
    return np.concatenate(ids).astype(np.int32)


def prepare_corpus(out, vocab_size: int, docs=None, val_docs=None, tokenizer_from=None) -> tuple[np.ndarray, dict]:
    """Train the tokenizer (once) and tokenize the corpus into `out`, returning (train stream, val streams). With
    `tokenizer_from` (the checkpoint a run fine-tunes: a folder or a .gguf) its own tokenizer instead, saved in
    `out` (its vocabulary size is the model's business, not `vocab_size`'s)."""
    out = Path(out)
    cached = out / "tokens.npz"
    if cached.is_file() and any((out / n).is_file() for n in ("vocab.json", "tokenizer.json")):
        z = read_tokens(cached)
        if tokenizer_from is None and z["vocab_size"] != vocab_size:
            raise RadialError(
                f"{cached}: prepared with a vocabulary of {z['vocab_size']}, not {vocab_size}; "
                "use the same --vocab-size or a new --out"
            )
        return z["train"], {k[4:]: z[k] for k in z if k.startswith("val_")}
    if docs is None:
        docs, val_docs = default_corpus()
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is None:
        train_tokenizer(docs, vocab_size, out)
    else:
        Tokenizer(tokenizer_from).save(out)
    tok = Tokenizer(out)
    train_ids = tokenize_documents(tok, docs)
    val_ids = {name: tokenize_documents(tok, d) for name, d in val_docs.items()}
    vocab = np.int64(tok.vocab_size if tokenizer_from else vocab_size)
    write_npz(cached, train=train_ids, vocab_size=vocab, **{"val_" + k: a for k, a in val_ids.items()})
    return train_ids, val_ids


def read_tokens(path: Path) -> dict:
    """A run's tokens.npz, checked before use: 1-D integer streams `train` and `val_*` with ids inside the
    vocabulary it records (`vocab_size`). Each array's size is bounded by its zip record before it is inflated."""
    again = "delete it to prepare the corpus again"
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as f:
                    npy_header(f, info.file_size)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError) as e:
        why = f"{type(e).__name__}: {str(e)[:80]!r}"
        raise RadialError(f"{path}: not a readable token cache ({why}); {again}") from None
    size = arrays.get("vocab_size")
    if size is None or size.shape != () or size.dtype.kind not in "iu" or not 0 < size <= 1 << 22:
        raise RadialError(f"{path}: 'vocab_size' is missing or not a vocabulary size; {again}")
    streams = {k: a for k, a in arrays.items() if k == "train" or k.startswith("val_")}
    if "train" not in streams or len(streams) < 2:
        raise RadialError(f"{path}: expected a 'train' stream and 'val_*' streams, found {sorted(arrays)}; {again}")
    for k, a in streams.items():
        if a.ndim != 1 or a.dtype.kind not in "iu" or (a.size and not 0 <= a.min() <= a.max() < size):
            raise RadialError(f"{path}: '{k}' is not a 1-D stream of token ids below {int(size)}; {again}")
    return {**streams, "vocab_size": int(size)}


def validation_sequences(stream: np.ndarray, seq_len: int, n: int) -> np.ndarray:
    """n windows of seq_len + 1 tokens spread evenly over a validation stream (fixed, so evaluations compare)."""
    starts = np.linspace(0, len(stream) - seq_len - 1, n).astype(np.int64)
    return np.stack([stream[s : s + seq_len + 1] for s in starts]).astype(np.int64)

"""Our Tokenizer equals transformers' GPT2Tokenizer on OPT's vocabulary, and the Streamer prints only whole text.

The reference ids (tests/fixtures/tokenizer_reference.json) were made by tools/make_reference.py with transformers
from ../shared/data/opt-tokenizer, on 400 non-empty lines of WikiText-2's test split given by line number.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import radial_min
from conftest import shared
from radial_min.data import SHARED
from radial_min.errors import CheckpointError
from radial_min.io.tokenizer import Streamer

FIXTURES = Path(__file__).parent / "fixtures"
OPT_TOKENIZER = SHARED / "opt-tokenizer"
MIXED = "Naïve café — “quotes” 日本語 and emoji 🙂👍🏽, Ελληνικά, Ærøskøbing."


@pytest.fixture(scope="module", autouse=True)
def _needs_opt_tokenizer():
    shared("opt-tokenizer", "vocab.json")


@pytest.fixture(scope="module")
def ref():
    return json.loads((FIXTURES / "tokenizer_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def lines(ref):
    path = shared(ref["wikitext_file"])
    return path.read_text(encoding="utf-8").split("\n")


@pytest.fixture(scope="module")
def tok():
    return radial_min.Tokenizer(OPT_TOKENIZER)


def test_reference_covers_what_it_claims(ref, lines):
    """Guards the fixture itself: 400 distinct non-empty lines, one id list each, all starting with BOS."""
    assert len(ref["line_numbers"]) == len(ref["line_ids"]) == 400
    assert len(set(ref["line_numbers"])) == 400
    assert all(lines[n].strip() for n in ref["line_numbers"])
    assert all(ids[0] == 2 for ids in ref["line_ids"])


def test_wikitext_lines_give_the_reference_ids(tok, ref, lines):
    wrong = [n for n, ids in zip(ref["line_numbers"], ref["line_ids"]) if tok.encode(lines[n]).tolist() != ids]
    assert wrong == []


def test_encode_returns_int64_array(tok):
    ids = tok.encode("Hello world")
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64 and ids.ndim == 1
    assert ids.tolist() == [2, 31414, 232]


def test_extra_texts_ids_and_decoding(tok, ref):
    """Special tokens inside text, leading spaces, non-ASCII and control characters, as transformers does them."""
    for text, ids, decoded in zip(ref["extra_texts"], ref["extra_ids"], ref["extra_decoded"]):
        assert tok.encode(text).tolist() == ids, text
        assert tok.decode(ids) == decoded, text
    # `</s>` and `<pad>` in the text are matched whole as their ids; `<unk>` and `<s>` are ordinary text for OPT
    assert ref["extra_ids"][1][:5] == [2, 102, 1437, 2, 741]


def test_decode_round_trips_wikitext(tok, ref, lines):
    bad = [n for n in ref["line_numbers"] if tok.decode(tok.encode(lines[n])) != lines[n]]
    assert bad == []


def test_decode_round_trips_unusual_text(tok):
    texts = [MIXED, "  two leading spaces", "tabs\tand\nnewlines\r\n", "", " ", "x" * 500, "\ufffd literal replacement"]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_special_ids_and_sizes(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == (2, 2, 50265, True)
    assert tok.decode([2, 31414, 232]) == "Hello world"
    assert tok.decode([2, 31414, 232], skip_special=False) == "</s>Hello world"


def test_bos_option(tok):
    assert tok.encode("Hello world", bos=False).tolist() == [31414, 232]
    assert tok.encode("Hello world", bos=True).tolist() == [2, 31414, 232]
    assert tok.encode("", bos=False).tolist() == []
    assert tok.encode("").tolist() == [2]


def test_add_bos_token_false_in_config(tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(OPT_TOKENIZER, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    t = radial_min.Tokenizer(folder)
    assert t.encode("Hello world").tolist() == [31414, 232]
    assert t.encode("Hello world", bos=True).tolist() == [2, 31414, 232]


def save_tokenizer_json(folder: Path) -> Path:
    """Build the same byte-level BPE with the `tokenizers` library and save it as a lone tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    t = Tokenizer(models.BPE.from_file(str(OPT_TOKENIZER / "vocab.json"), str(OPT_TOKENIZER / "merges.txt")))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True)
    t.save(str(folder / "tokenizer.json"))
    return folder


def test_tokenizer_json_only_folder_works_the_same(tmp_path, tok, ref, lines):
    folder = save_tokenizer_json(tmp_path / "json-only")
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json"]
    t = radial_min.Tokenizer(folder)
    assert (t.bos_id, t.eos_id, t.vocab_size) == (2, 2, 50265)
    for n, ids in zip(ref["line_numbers"][:100], ref["line_ids"][:100]):
        assert t.encode(lines[n]).tolist() == ids
    for text, ids, decoded in zip(ref["extra_texts"], ref["extra_ids"], ref["extra_decoded"]):
        assert t.encode(text).tolist() == ids
        assert t.decode(ids) == decoded
    assert t.encode(MIXED).tolist() == tok.encode(MIXED).tolist()


def test_folder_without_tokenizer_files(tmp_path):
    folder = tmp_path / "model-without-tokenizer"
    shutil.copytree(FIXTURES / "opt-pre", folder)
    with pytest.raises(CheckpointError) as e:
        radial_min.Tokenizer(folder)
    assert str(folder) in str(e.value) and "tokenizer.json" in str(e.value)
    (folder / "vocab.json").write_text("{}")  # vocab.json without merges.txt is no tokenizer either
    with pytest.raises(CheckpointError, match="vocab.json and merges.txt"):
        radial_min.Tokenizer(folder)


def test_malformed_tokenizer_files_name_the_file(tmp_path):
    """The tokenizers library raises a bare Exception; we turn it into a CheckpointError naming the file."""
    folder = tmp_path / "broken-json"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(CheckpointError) as e:
        radial_min.Tokenizer(folder)
    assert str(folder / "tokenizer.json") in str(e.value) and "\n" not in str(e.value)

    folder = tmp_path / "broken-bpe"
    folder.mkdir()
    (folder / "vocab.json").write_text("not json")
    shutil.copy(OPT_TOKENIZER / "merges.txt", folder / "merges.txt")
    with pytest.raises(CheckpointError, match="vocab.json"):
        radial_min.Tokenizer(folder)

    folder = tmp_path / "bad-config"
    shutil.copytree(OPT_TOKENIZER, folder)
    (folder / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="tokenizer_config.json: not valid JSON"):
        radial_min.Tokenizer(folder)


def test_special_token_outside_the_vocabulary_gets_a_fresh_id(tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(OPT_TOKENIZER, folder)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|nowhere|>"}))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    t = radial_min.Tokenizer(folder)  # added as a special token, so it gets a fresh id past the vocabulary
    assert t.eos_id == 50265 and t.encode("a<|nowhere|>", bos=False).tolist() == [102, 50265]


# ------------------------------------------------------------------------------------------------ streaming


def stream_pieces(tok, ids):
    """Feed ids one at a time; return what was written after each token (one list per token)."""
    written = []
    s = Streamer(tok, written.append)
    per_token = []
    for i in ids:
        before = len(written)
        s(i)
        per_token.append(written[before:])
    return s, written, per_token


def test_streamer_never_writes_a_partial_character(tok):
    ids = tok.encode(MIXED, bos=False).tolist()
    singles = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in singles), "the text should split characters across tokens"
    s, written, per_token = stream_pieces(tok, ids)
    assert all("\ufffd" not in p and p for p in written)
    assert "".join(written) == tok.decode(ids) == MIXED
    assert s.finish() == ""  # nothing held back: the text ends on a whole character


def test_streamer_prints_incrementally(tok):
    """After every token the output so far is the longest decodable prefix: nothing is held back needlessly."""
    ids = tok.encode(MIXED, bos=False).tolist()
    _, written, per_token = stream_pieces(tok, ids)
    shown = ""
    held = 0
    for k, pieces in enumerate(per_token, 1):
        shown += "".join(pieces)
        text = tok.decode(ids[:k])
        if text.endswith("\ufffd"):
            assert pieces == [] and text.startswith(shown)
            held += 1
        else:
            assert shown == text
    assert held >= 3  # the accents, quotes, CJK and emoji made it hold back several times
    assert len(written) == len(ids) - held


def test_streamer_with_bos_and_eos(tok):
    """Special tokens decode to nothing, so they write nothing."""
    ids = [2] + tok.encode("Hello world", bos=False).tolist() + [2]
    _, written, per_token = stream_pieces(tok, ids)
    assert per_token[0] == [] and per_token[-1] == []
    assert "".join(written) == "Hello world"


def test_streamer_finish_writes_an_incomplete_tail(tok):
    """Generation can stop in the middle of a character; finish() then writes what decode() gives for it."""
    ids = tok.encode("日本語 🙂", bos=False).tolist()
    for cut in range(1, len(ids) + 1):
        part = ids[:cut]
        s, written, _ = stream_pieces(tok, part)
        assert all("\ufffd" not in p for p in written)
        tail = s.finish()
        assert "".join(written) == tok.decode(part), cut
        assert tail.endswith("\ufffd") == tok.decode(part).endswith("\ufffd")
    assert any(tok.decode(ids[:c]).endswith("\ufffd") for c in range(1, len(ids)))


def test_streamer_handles_a_real_replacement_character(tok):
    text = "bad byte \ufffd here, and at the end \ufffd"
    ids = tok.encode(text, bos=False).tolist()
    s, written, _ = stream_pieces(tok, ids)
    before = "".join(written)
    assert before.startswith("bad byte \ufffd here, and at the end")  # the one in the middle is shown ...
    assert before.count("\ufffd") == 1 and text.startswith(before)  # ... the last one is held back ...
    assert s.finish() == text[len(before) :] and text[len(before) :].endswith("\ufffd")  # ... until the end
    assert "".join(written) == text

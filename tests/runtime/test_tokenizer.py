"""Kiln's tokenizer against transformers 5 on tokenizers trained here, and streaming decoding.

Three kinds of tokenizer files are built in the test: byte-level BPE (GPT-2 / Llama 3 style), a
Llama 2 style byte-fallback BPE saved by transformers as a generic backend, and the same files
declaring LlamaTokenizer, which transformers rebuilds with a Metaspace pre-tokenizer.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kiln.runtime.errors import KilnError
from kiln.runtime.tokenizer import Tokenizer

CORPUS = [
    "Hello world, this is a small test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog. It's 2024!",
    "Grüße aus München: Äpfel, Öl und Übermut.",
    "你好世界。今天天气很好。我们去公园散步吧。",
    "日本語のテキストも少し入れておきます。",
    "Привет, мир! Как дела?",
    "def add(a, b):\n    return a + b\n",
    "emoji 😀 and 🎉 and 👍🏽 appear sometimes",
] * 30

TEXTS = [
    "Hello world",
    " Hello  world",
    "Grüße aus München!",
    "你好世界。",
    "emoji 😀🎉 and a rare one 🦜",
    "line one\nline two\n\n  indented",
    "",
    "The fox.",
]

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

CHATML_TEMPLATE = """{% for message in messages %}
{% if message['role'] == 'assistant' %}
<|im_start|>assistant
{% generation %}{{ message['content'] }}{% endgeneration %}<|im_end|>
{% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there! 你好 😀"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": 'Say <b>more</b>, "quoted".'},
]


def _byte_level_tokenizer() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|begin|>", "<|end|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<|begin|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", pair="<|begin|> $A <|begin|> $B", special_tokens=[("<|begin|>", bos)]
    )
    return tok


def _llama2_tokenizer() -> HFTokenizer:
    """A Llama 2 tokenizer.json in miniature: byte-fallback BPE, "▁" for spaces, BOS added."""
    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<unk>", "<s>", "</s>"]
    trained.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials)
    )
    spec = json.loads(trained.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    order = specials + bytes_ + [t for t, _ in learned if t not in specials]
    spec["model"].update(
        vocab={t: i for i, t in enumerate(order)},
        byte_fallback=True,
        fuse_unk=True,
        unk_token="<unk>",
    )
    for added in spec["added_tokens"]:
        added["id"] = specials.index(added["content"])
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    spec["pre_tokenizer"] = None
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    tok = HFTokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def _save(tok: HFTokenizer, path: Path, template: str | None, **special: str) -> Path:
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(path)
    return path


def _edit_config(path: Path, **changes: object) -> None:
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    byte_level = _save(
        _byte_level_tokenizer(),
        root / "byte_level",
        CHATML_TEMPLATE,
        bos_token="<|begin|>",
        eos_token="<|end|>",
    )
    (byte_level / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": [1, 3]})
    )
    llama_specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    llama2 = _save(_llama2_tokenizer(), root / "llama2", LLAMA2_TEMPLATE, **llama_specials)
    result = {"byte_level": byte_level, "llama2": llama2}
    for legacy in (False, True):
        name = f"llama_class_legacy_{legacy}"
        shutil.copytree(llama2, root / name)
        _edit_config(root / name, tokenizer_class="LlamaTokenizerFast", legacy=legacy)
        result[name] = root / name
    return result


ALL_KINDS = ["byte_level", "llama2", "llama_class_legacy_False", "llama_class_legacy_True"]


@pytest.fixture(scope="module")
def loaded(dirs) -> dict[str, tuple[Tokenizer, object]]:
    out = {}
    for name, path in dirs.items():
        kiln_tok = Tokenizer.from_dir(path)
        assert kiln_tok is not None
        out[name] = (kiln_tok, AutoTokenizer.from_pretrained(path))
    return out


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_encode_matches_transformers(loaded, kind):
    kiln_tok, hf = loaded[kind]
    bos, eos = kiln_tok.special_tokens["bos_token"], kiln_tok.special_tokens["eos_token"]
    for text in [*TEXTS, f"{bos}[INST] hi [/INST]", f"a{eos}\nb", f"x {eos} y{bos}z"]:
        assert kiln_tok.encode(text) == hf(text)["input_ids"], text
        no_special = hf(text, add_special_tokens=False)["input_ids"]
        assert kiln_tok.encode(text, add_special_tokens=False) == no_special, text


def test_llama_class_really_differs_from_its_tokenizer_json(loaded):
    # Guards the reason for _as_llama_tokenizer: if transformers stops rebuilding, this fails.
    plain, _ = loaded["llama2"]
    rebuilt, _ = loaded["llama_class_legacy_False"]
    assert plain.encode(" Hello") != rebuilt.encode(" Hello")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_decode_matches_transformers(loaded, kind):
    kiln_tok, hf = loaded[kind]
    for text in TEXTS:
        ids = hf(text)["input_ids"] + [kiln_tok.eos_token_ids[0]]
        for skip in (True, False):
            assert kiln_tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_vocab_size_and_special_ids(loaded, kind):
    kiln_tok, hf = loaded[kind]
    assert kiln_tok.vocab_size == len(hf)
    assert kiln_tok.bos_token_id == hf.bos_token_id
    assert kiln_tok.eos_token_ids[0] == hf.eos_token_id


@pytest.mark.parametrize(
    "changes",
    [
        {"eos_token": "<|im_end|>"},  # named: becomes special
        {"image_token": "<|im_end|>"},  # any *_token key counts as named
        {"extra_special_tokens": ["<|im_end|>"]},  # unnamed and present: left as it is
        {"pad_token": "<pad>", "extra_special_tokens": ["<new>"]},  # missing: added as special
        {"added_tokens_decoder": {"3": {"content": "<|im_end|>", "special": True}}},
        {"eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "normalized": False}},
    ],
)
def test_config_special_tokens_are_registered_like_transformers(dirs, tmp_path, changes):
    path = tmp_path / "specials"
    shutil.copytree(dirs["byte_level"], path)
    spec = json.loads((path / "tokenizer.json").read_text())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] != "<|im_end|>"
    (path / "tokenizer.json").write_text(json.dumps(spec))
    _edit_config(path, **changes)
    kiln_tok, hf = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    assert kiln_tok.vocab_size == len(hf)
    text = "a<pad>b<|im_end|>c<new>d"
    ids = hf(text)["input_ids"]
    assert kiln_tok.encode(text) == ids
    for skip in (True, False):
        assert kiln_tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


def test_legacy_special_tokens_map_overrides_config(dirs, tmp_path):
    path = tmp_path / "legacy_map"
    shutil.copytree(dirs["byte_level"], path)
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    kiln_tok, hf = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    assert kiln_tok.special_tokens["eos_token"] == hf.eos_token == "<|im_end|>"


def test_eos_ids_include_generation_config(loaded):
    kiln_tok, _ = loaded["byte_level"]
    assert kiln_tok.eos_token_ids == [1, 3]  # <|end|> from the config, <|im_end|> added


@pytest.mark.parametrize(("kind", "messages"), [("llama2", MESSAGES), ("byte_level", MESSAGES)])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(loaded, kind, messages, add_generation_prompt):
    kiln_tok, hf = loaded[kind]
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert kiln_tok.apply_chat_template(messages, add_generation_prompt) == expected
    expected_ids = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )["input_ids"]
    assert kiln_tok.encode_chat(messages, add_generation_prompt) == expected_ids


def test_chat_encoding_has_one_bos(loaded):
    kiln_tok, _ = loaded["llama2"]
    ids = kiln_tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == kiln_tok.bos_token_id
    assert ids[1] != kiln_tok.bos_token_id


def test_template_features_match_transformers(dirs, tmp_path):
    path = tmp_path / "tpl"
    shutil.copytree(dirs["byte_level"], path)
    (path / "chat_template.jinja").write_text(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{{ m | tojson }}{% if loop.index == 2 %}{% break %}{% endif %}{% endfor %}"
        "{{ ns.n }}{{ bos_token }}{{ eos_token }}{{ tools }}"
    )
    messages = [*MESSAGES, {"role": "user", "content": "x", "name": None}]
    hf = AutoTokenizer.from_pretrained(path)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_dir(path).apply_chat_template(messages) == expected


def test_legacy_template_list_in_config(dirs, tmp_path):
    path = tmp_path / "legacy"
    shutil.copytree(dirs["byte_level"], path)
    (path / "chat_template.jinja").unlink()
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "D"}]
    _edit_config(path, chat_template=templates)
    assert Tokenizer.from_dir(path).apply_chat_template(MESSAGES) == "D"


def test_jinja_file_wins_over_config_template(dirs, tmp_path):
    path = tmp_path / "both"
    shutil.copytree(dirs["byte_level"], path)
    _edit_config(path, chat_template="FROM CONFIG")
    hf = AutoTokenizer.from_pretrained(path)
    expected = hf.apply_chat_template(MESSAGES, tokenize=False)
    assert Tokenizer.from_dir(path).apply_chat_template(MESSAGES, False) == expected


def test_missing_template_raises(dirs, tmp_path):
    path = tmp_path / "none"
    shutil.copytree(dirs["byte_level"], path)
    (path / "chat_template.jinja").unlink()
    with pytest.raises(KilnError, match=r"no chat template.*generate\(\)"):
        Tokenizer.from_dir(path).apply_chat_template(MESSAGES)


def test_raising_template_gives_its_message(loaded):
    kiln_tok, _ = loaded["llama2"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(KilnError, match="roles must alternate"):
        kiln_tok.apply_chat_template(bad)


def test_bad_messages_and_bad_template_raise(dirs, tmp_path):
    kiln_tok = Tokenizer.from_dir(dirs["byte_level"])
    with pytest.raises(KilnError, match="non-empty list"):
        kiln_tok.apply_chat_template([])
    path = tmp_path / "syntax"
    shutil.copytree(dirs["byte_level"], path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(KilnError, match=r"chat_template\.jinja"):
        Tokenizer.from_dir(path).apply_chat_template(MESSAGES)


def test_from_dir_without_tokenizer_json_is_none(tmp_path):
    assert Tokenizer.from_dir(tmp_path) is None


def test_corrupt_files_raise_naming_the_file(dirs, tmp_path):
    path = tmp_path / "corrupt"
    shutil.copytree(dirs["byte_level"], path)
    (path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(KilnError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(path)
    shutil.copy(dirs["byte_level"] / "tokenizer.json", path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(KilnError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(path)


# Streaming detokenization


def _stream(kiln_tok: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> list[str]:
    stream = kiln_tok.text_stream(stop)
    return [stream.put(i) for i in ids] + [stream.finish()]


def _random_ids(kiln_tok: Tokenizer, rng: random.Random) -> list[int]:
    """Ids that decode to valid UTF-8 but are often not the tokenizer's own encoding."""
    pieces = ["hello", " world", "你好", "世界", "😀", "🎉", "👍🏽", "🦜", "Grüße", "Ü", " ", "\n"]
    ids: list[int] = []
    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        if roll < 0.6:
            text = "".join(rng.choices(pieces, k=rng.randint(1, 4)))
            ids += kiln_tok.encode(text, add_special_tokens=False)
        elif roll < 0.8:
            ids.append(rng.choice(_clean_tokens(kiln_tok)))
        else:
            ids.append(rng.choice([kiln_tok.bos_token_id, *kiln_tok.eos_token_ids]))
    return ids


_CLEAN: dict[int, list[int]] = {}


def _clean_tokens(kiln_tok: Tokenizer) -> list[int]:
    """Vocabulary entries that decode to whole characters on their own."""
    key = id(kiln_tok)
    if key not in _CLEAN:
        decoded = ((i, kiln_tok.decode([i])) for i in range(kiln_tok.vocab_size))
        _CLEAN[key] = [i for i, text in decoded if text and "\ufffd" not in text]
    return _CLEAN[key]


@pytest.mark.parametrize("kind", ["byte_level", "llama2", "llama_class_legacy_False"])
def test_stream_pieces_join_to_decode(loaded, kind):
    kiln_tok, _ = loaded[kind]
    rng = random.Random(kind)
    for _ in range(300):
        ids = _random_ids(kiln_tok, rng)
        expected = kiln_tok.decode(ids)
        assert "\ufffd" not in expected
        pieces = _stream(kiln_tok, ids)
        assert "".join(pieces) == expected, ids
        assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("kind", ["byte_level", "llama2"])
def test_stream_holds_multibyte_character_until_complete(loaded, kind):
    kiln_tok, _ = loaded[kind]
    ids = kiln_tok.encode("ab🦜", add_special_tokens=False)
    assert len(ids) > 2  # the parrot is unknown to both vocabularies, so it arrives in pieces
    pieces = _stream(kiln_tok, ids)
    assert "".join(pieces) == "ab🦜"
    assert pieces[-2].endswith("🦜")  # it appears whole, with its last byte


@pytest.mark.parametrize("skip", [True, False])
def test_stream_keeps_special_tokens_when_asked(loaded, skip):
    kiln_tok, _ = loaded["llama2"]
    ids = [kiln_tok.bos_token_id, *kiln_tok.encode("Hi there", False), kiln_tok.eos_token_ids[0]]
    stream = kiln_tok.text_stream(skip_special_tokens=skip)
    text = "".join(stream.put(i) for i in ids) + stream.finish()
    assert text == kiln_tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", ["byte_level", "llama2"])
def test_stop_string_spanning_tokens(loaded, kind):
    kiln_tok, _ = loaded[kind]
    text = "hello world. The quick brown fox"
    ids = kiln_tok.encode(text, add_special_tokens=False)
    stop = "ld. The"
    # The stop string must not be a single token, or this would not test spanning.
    assert all(stop not in kiln_tok.decode([i]) for i in ids)
    stream = kiln_tok.text_stream((stop,))
    emitted = ""
    for i in ids:
        emitted += stream.put(i)
        assert stop not in emitted
        assert "ld" not in emitted[len("hello wor") :]
        if stream.stopped:
            break
    assert stream.stopped
    emitted += stream.finish()
    assert emitted == "hello wor"
    assert stream.put(ids[-1]) == ""


def test_stop_prefix_is_released_when_no_stop_follows(loaded):
    kiln_tok, _ = loaded["byte_level"]
    ids = kiln_tok.encode("the end", add_special_tokens=False)
    pieces = _stream(kiln_tok, ids, stop=("end!", "zzz"))
    assert "".join(pieces) == "the end"
    assert pieces[-1].endswith("end")  # held until finish() because "end!" might have followed


def test_earliest_of_several_stop_strings_wins(loaded):
    kiln_tok, _ = loaded["byte_level"]
    ids = kiln_tok.encode("one two three four", add_special_tokens=False)
    pieces = _stream(kiln_tok, ids, stop=("four", "two"))
    assert "".join(pieces) == "one "


@pytest.mark.parametrize("kind", ["byte_level", "llama2"])
def test_random_stop_strings_cut_at_first_occurrence(loaded, kind):
    kiln_tok, _ = loaded[kind]
    rng = random.Random(1)
    for _ in range(200):
        ids = _random_ids(kiln_tok, rng)
        full = kiln_tok.decode(ids)
        if len(full) < 3:
            continue
        start = rng.randrange(len(full) - 1)
        stop = full[start : start + rng.randint(1, 3)]
        pieces = _stream(kiln_tok, ids, stop=(stop,))
        assert "".join(pieces) == full[: full.find(stop)]

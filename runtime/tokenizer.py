"""Text to token ids and back, from a model's Hugging Face tokenizer files.

The goal is to give exactly the ids and text that `transformers.AutoTokenizer` (version 5) gives
for the same directory, without importing transformers. That means copying a few of its loading
rules, each noted where it is applied:

- `tokenizer.json` decides whether BOS/EOS are added; transformers 5 ignores `add_bos_token` and
  `add_eos_token` in `tokenizer_config.json` whenever `tokenizer.json` exists.
- A `tokenizer_config.json` naming `LlamaTokenizer` makes transformers rebuild the normalizer,
  pre-tokenizer and decoder instead of using those in `tokenizer.json` (see `_as_llama_tokenizer`).
- Named special tokens (`bos_token`, `eos_token`, any other `*_token`) are registered as special,
  so `decode(skip_special_tokens=True)` drops them.
- `chat_template.jinja` wins over a `chat_template` entry in `tokenizer_config.json`.

`clean_up_tokenization_spaces` is not applied: transformers 5 ignores it for BPE models too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kiln.runtime.errors import KilnError

_TOKENIZER_FILE = "tokenizer.json"
_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
_GENERATION_CONFIG_FILE = "generation_config.json"
_MODEL_CONFIG_FILE = "config.json"
_CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Model types whose tokenizer transformers 5 loads with another class even when the files name
# LlamaTokenizer (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS and types mapped to its generic
# backend, in transformers.models.auto.tokenization_auto), limited to text LLM families.
_NOT_LOADED_AS_LLAMA = frozenset(
    {
        "arctic", "chatlm", "ernie4_5", "ernie4_5_moe", "glm", "glm4", "glm4_moe", "granite",
        "granitemoe", "granitemoehybrid", "granitemoeshared", "internlm2", "internlm3", "jamba",
        "kimi_linear", "minicpm3", "ministral", "ministral3", "mistral", "mistral3", "mixtral",
        "nemotron", "olmo2", "olmo3", "persimmon", "phi3", "phimoe", "qwen2", "stablelm",
    }
)  # fmt: skip


class Tokenizer:
    """A model's tokenizer: encode, decode, chat template, and streaming detokenization."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        fallback_bos_token_id: int | None = None,
        chat_template: str | None = None,
        chat_template_source: str = "the chat template",
    ) -> None:
        self._backend = backend
        self._special_tokens = dict(special_tokens or {})
        self._chat_template = chat_template
        self._chat_template_source = chat_template_source
        self._compiled_template: Any = None

        eos = [self.token_to_id(self._special_tokens.get("eos_token", ""))]
        self._eos_token_ids = list(
            dict.fromkeys(t for t in [*eos, *extra_eos_token_ids] if t is not None)
        )
        bos = self.token_to_id(self._special_tokens.get("bos_token", ""))
        self._bos_token_id = bos if bos is not None else fallback_bos_token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """Load the tokenizer files in path; None when the directory has no tokenizer.json."""
        path = Path(path)
        tokenizer_file = path / _TOKENIZER_FILE
        if not tokenizer_file.is_file():
            return None
        config = _read_json(path / _TOKENIZER_CONFIG_FILE)
        if "added_tokens_decoder" not in config:
            # Older checkpoints keep special tokens here; transformers then lets it override.
            config.update(_read_json(path / _SPECIAL_TOKENS_MAP_FILE))
        generation = _read_json(path / _GENERATION_CONFIG_FILE)
        model_config = _read_json(path / _MODEL_CONFIG_FILE)

        backend = _load_backend(tokenizer_file, config, model_config)
        special_tokens = _register_special_tokens(backend, config)
        template, source = _find_chat_template(path, config)
        return cls(
            backend,
            special_tokens=special_tokens,
            extra_eos_token_ids=_as_id_list(generation.get("eos_token_id")),
            fallback_bos_token_id=next(iter(_as_id_list(generation.get("bos_token_id"))), None),
            chat_template=template,
            chat_template_source=source,
        )

    @property
    def vocab_size(self) -> int:
        """How many token ids exist, added tokens included (`len()` of a transformers tokenizer)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: tokenizer_config's eos_token plus generation_config's."""
        return list(self._eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens from the config, such as {"bos_token": "<s>"}."""
        return dict(self._special_tokens)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token) if token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for text; add_special_tokens adds what tokenizer.json adds (usually BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render messages with the model's chat template, as transformers does."""
        if self._chat_template is None:
            raise KilnError(
                "This model has no chat template (no chat_template.jinja and no chat_template in "
                "tokenizer_config.json); use generate() with a plain prompt instead of chat()."
            )
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(
                self._chat_template, self._chat_template_source
            )
        return _render_chat_template(
            self._compiled_template, messages, add_generation_prompt, self._special_tokens
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids for a chat.

        The template writes any BOS itself, so the text is encoded without special tokens (as
        transformers does); encoding it with them would put a second BOS in front.
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def text_stream(self, stop: Iterable[str] = (), skip_special_tokens: bool = True) -> TextStream:
        """A TextStream that turns generated ids into text as they arrive."""
        return TextStream(self, stop=stop, skip_special_tokens=skip_special_tokens)


class TextStream:
    """Streaming detokenization with stop strings.

    Each put() decodes a small window of recent tokens and returns only the text that is final:
    text ending in an incomplete UTF-8 character waits for the next token, and so does any tail
    that could be the beginning of a stop string. Decoding windows (rather than single tokens)
    keeps decoder context such as SentencePiece's leading-space handling, so without a stop
    string the pieces put() and finish() return join to exactly `tokenizer.decode(all_ids)`
    for any ids that decode to valid UTF-8.

    `stopped` turns True once a stop string appears; only the text before it is ever returned,
    and later put() calls return "".
    """

    def __init__(
        self, tokenizer: Tokenizer, stop: Iterable[str] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = tuple(s for s in ((stop,) if isinstance(stop, str) else stop) if s)
        self._ids: list[int] = []
        # Tokens before _prefix are fully emitted; _prefix:_read is the window decoded last time,
        # kept as context for the next decode.
        self._prefix = 0
        self._read = 0
        self._held = ""  # decoded text not yet returned because a stop string may start in it
        self.stopped = False

    def put(self, token_id: int) -> str:
        """Add one generated token; return the text that became final."""
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        return self._release(self._decode_new(final=False), final=False)

    def finish(self) -> str:
        """Return everything still held back, except a stop string and what follows it."""
        if self.stopped:
            return ""
        return self._release(self._decode_new(final=True), final=True)

    def _decode_new(self, final: bool) -> str:
        def decode(ids: list[int]) -> str:
            return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

        before = decode(self._ids[self._prefix : self._read])
        after = decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def _release(self, text: str, final: bool) -> str:
        if not self._stop:
            return text
        self._held += text
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self._held = self._held[: min(hits)], ""
            return out
        keep = 0 if final else self._partial_stop_length(self._held)
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest tail of text that is the start of some stop string."""
        longest = min(len(text), max(len(s) for s in self._stop) - 1)
        for n in range(longest, 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KilnError(
            f"{path} is not valid JSON ({e}); restore it from the original model."
        ) from e
    if not isinstance(data, dict):
        raise KilnError(f"{path} should hold a JSON object; restore it from the original model.")
    return data


def _load_backend(
    tokenizer_file: Path, config: dict[str, Any], model_config: dict[str, Any]
) -> tokenizers.Tokenizer:
    try:
        text = tokenizer_file.read_text(encoding="utf-8")
        if _loads_as_llama_tokenizer(text, config, model_config):
            backend = tokenizers.Tokenizer.from_str(json.dumps(_as_llama_tokenizer(text, config)))
        else:
            backend = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the Rust parser raises bare Exception subclasses
        raise KilnError(
            f"{tokenizer_file} could not be loaded ({e}); restore it from the original model."
        ) from e
    # A tokenizer.json may carry training-time truncation or padding; prompts must stay whole.
    backend.no_truncation()
    backend.no_padding()
    return backend


def _loads_as_llama_tokenizer(
    text: str, config: dict[str, Any], model_config: dict[str, Any]
) -> bool:
    """Whether AutoTokenizer would build transformers' LlamaTokenizer class for these files."""
    declared = config.get("tokenizer_class") or model_config.get("tokenizer_class") or ""
    return (
        declared.removesuffix("Fast") == "LlamaTokenizer"
        and "auto_map" not in config
        and model_config.get("model_type") not in _NOT_LOADED_AS_LLAMA
        # transformers checks the raw text this way: byte-level files (Llama 3) stay as saved.
        and '"ByteLevel"' not in text
    )


def _as_llama_tokenizer(text: str, config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json rewritten the way transformers' LlamaTokenizer.__init__ rebuilds it.

    It keeps the vocabulary, merges, added tokens and post-processor, but replaces the saved
    normalizer (Llama 2 files prepend "▁" to every segment, including those after a special
    token) with a Metaspace pre-tokenizer that, unless `legacy` is true, prepends only at the
    very start of the text. This changes ids for leading spaces and for text after special tokens.
    """
    spec = json.loads(text)
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    if not add_prefix_space:
        scheme = "never"
    else:
        scheme = "always" if config.get("legacy") else "first"
    model = spec.get("model") or {}
    spec["model"] = {
        **model,
        "unk_token": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "dropout": None,
    }
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": scheme,
        "split": False,
    }
    decoders: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_prefix_space:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    spec["decoder"] = {"type": "Sequence", "decoders": decoders}
    return spec


def _register_special_tokens(
    backend: tokenizers.Tokenizer, config: dict[str, Any]
) -> dict[str, str]:
    """Add the config's added and special tokens to backend as transformers does; return names."""
    existing = {repr(t) for t in backend.get_added_tokens_decoder().values()}
    declared = config.get("added_tokens_decoder") or {}
    for _, entry in sorted(declared.items(), key=lambda kv: int(kv[0])):
        if isinstance(entry, dict) and "content" in entry:
            token = _added_token(entry)
            if repr(token) not in existing:
                backend.add_tokens([token])

    named: dict[str, str] = {}
    to_mark: list[tokenizers.AddedToken] = []
    for key, value in config.items():
        content = _token_content(value)
        if key.endswith("_token") and content is not None:
            named[key] = content
            to_mark.append(_special_added_token(backend, value))
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        named.update({k: c for k, v in extra.items() if (c := _token_content(v)) is not None})
        extra = list(extra.values())
    # Unnamed extras are only added when missing: transformers leaves existing ones as they are.
    missing = [v for v in extra if (c := _token_content(v)) and backend.token_to_id(c) is None]
    to_mark.extend(_special_added_token(backend, v) for v in missing)
    if to_mark:
        # Marking them special is what makes decode(skip_special_tokens=True) drop them.
        backend.add_special_tokens(to_mark)
    return named


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(entry: dict[str, Any]) -> tokenizers.AddedToken:
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return tokenizers.AddedToken(entry["content"], **{k: entry[k] for k in flags if k in entry})


def _special_added_token(backend: tokenizers.Tokenizer, value: Any) -> tokenizers.AddedToken:
    content = _token_content(value)
    if isinstance(value, dict):
        return _added_token({**value, "special": True})
    for token in backend.get_added_tokens_decoder().values():
        if token.content == content:
            return token  # keep its lstrip/rstrip behaviour
    return tokenizers.AddedToken(content, special=True, normalized=False)


def _find_chat_template(path: Path, config: dict[str, Any]) -> tuple[str | None, str]:
    jinja_file = path / _CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    source = f"the chat_template in {path / _TOKENIZER_CONFIG_FILE}"
    template = config.get("chat_template")
    if isinstance(template, list):
        # Older files keep several named templates; transformers uses "default" for plain chat.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template if isinstance(template, str) else None), source


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


# Chat templates are untrusted code from the model repository: they run in Jinja's sandbox with
# the same environment transformers builds (utils/chat_template_utils.py), so the rendered text
# matches it character for character.


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' {% generation %} blocks, which mark assistant text for training."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 reads it as a class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore names, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _compile_chat_template(template: str, source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise KilnError(
            f"{source} is not a valid Jinja template ({e.message}, line {e.lineno}); "
            "fix it or remove it to chat without a template."
        ) from e


def _render_chat_template(
    template: jinja2.Template,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    special_tokens: dict[str, str],
) -> str:
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        raise KilnError(
            "Chat messages must be a non-empty list of dicts like "
            "{'role': 'user', 'content': 'Hello'}."
        )
    try:
        return template.render(
            **special_tokens,
            messages=[_normalize_message(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )
    except jinja2.TemplateError as e:
        raise KilnError(
            f"The model's chat template rejected these messages: {e.message}. "
            "Change the messages to the form the template expects."
        ) from e
    except Exception as e:  # a template is arbitrary code; any failure is about the input
        raise KilnError(
            f"The model's chat template failed on these messages ({type(e).__name__}: {e}); "
            "give every message a 'role' and a string 'content'."
        ) from e


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    # transformers drops None values (templates print them as "None") and copies the reasoning
    # under the names the templates of different families read.
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message

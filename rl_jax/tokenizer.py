"""Tokenizers with one interface: a character tokenizer for embedded tasks, and a thin wrapper
over Hugging Face `tokenizers` for real checkpoints.

Both expose `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `encode`, `decode`, `encode_batch`,
`decode_batch` and `save` (the Hugging Face tokenizer files, for `rl_jax.export`). Batches are numpy int32 arrays: prompts are left-padded so that the last prompt
token of every row sits in the same column (the sampler appends responses there), and
`mask` is 1 on real tokens, 0 on padding.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Sequence

import numpy as np
import tokenizers

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_NUM_SPECIAL = 3
_SPECIAL_NAMES = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>"}
# The files of a Hugging Face tokenizer directory that `HFTokenizer.save` copies when present.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)

# Append-only: ids of existing characters must never change, or cached checkpoints break.
CHAR_ALPHABET = "0123456789+-*/=#,.:;?!()<> _abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n"


def _decode_ids(ids: Sequence[int], eos_id: int, special_ids: frozenset[int], skip_special: bool):
    """Truncate at the first EOS and optionally drop special ids: the kept ids, as a list."""
    ids = [int(i) for i in ids]
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    if skip_special:
        ids = [i for i in ids if i not in special_ids]
    return ids


def _pad_batch(
    rows: list[list[int]], pad_id: int, length: int | None, padding_side: str
) -> tuple[np.ndarray, np.ndarray]:
    """Pad token rows to `length` (default: the longest row): (ids, mask), both int32 [B, T]."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    longest = max((len(r) for r in rows), default=0)
    if length is None:
        length = longest
    if longest > length:
        raise ValueError(f"length={length} is shorter than the longest row ({longest} tokens)")
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for b, row in enumerate(rows):
        cols = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        ids[b, cols] = row
        mask[b, cols] = 1
    return ids, mask


class _BatchMixin:
    """`encode_batch` / `decode_batch` in terms of `encode` / `decode`."""

    def encode_batch(
        self,
        texts: Sequence[str],
        length: int | None = None,
        padding_side: str = "left",
        add_bos: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode and pad: (ids, mask), int32 [B, T]; T = `length` or the longest row."""
        rows = [self.encode(t, add_bos=add_bos) for t in texts]
        return _pad_batch(rows, self.pad_id, length, padding_side)

    def decode_batch(self, ids, skip_special: bool = True) -> list[str]:
        """Decode each row of ids [B, T] (each stops at its first EOS)."""
        return [self.decode(row, skip_special=skip_special) for row in np.asarray(ids)]


class CharTokenizer(_BatchMixin):
    """One token per character: pad 0, BOS 1, EOS 2, then `CHAR_ALPHABET` in order (ids 3..).

    Unknown characters raise `ValueError`: the embedded tasks only write alphabet characters,
    and silently mapping to an unknown token would hide generator bugs.
    """

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, alphabet: str = CHAR_ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet must not repeat characters")
        self.alphabet = alphabet
        self._char_to_id = {c: i + _NUM_SPECIAL for i, c in enumerate(alphabet)}
        self._special = frozenset((PAD_ID, BOS_ID, EOS_ID))
        self.vocab_size = len(alphabet) + _NUM_SPECIAL

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        try:
            ids = [self._char_to_id[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in the tokenizer alphabet"
            ) from None
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ids up to the first EOS; special ids are dropped (or shown as <pad>/<bos>)."""
        chars = []
        for i in _decode_ids(ids, EOS_ID, self._special, skip_special):
            if i in (PAD_ID, BOS_ID):
                chars.append(_SPECIAL_NAMES[i])
            elif _NUM_SPECIAL <= i < self.vocab_size:
                chars.append(self.alphabet[i - _NUM_SPECIAL])
            else:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return "".join(chars)

    def save(self, directory: str | pathlib.Path) -> None:
        """Writes `tokenizer.json` and `tokenizer_config.json` with this tokenizer's ids, which
        `tokenizers` and transformers load: `<pad>` `<bos>` `<eos>` at 0 1 2, BOS prepended to
        every encoded text (as rl_jax encodes prompts), one token per character.

        The characters are spelled as byte-level BPE symbols (space as "Ġ", newline as "Ċ") in a
        BPE model without merges: transformers loads a Qwen2 model directory's tokenizer as
        `Qwen2Tokenizer` whatever tokenizer_config.json says, which rebuilds exactly this
        pipeline from the vocabulary. Characters outside the alphabet encode to nothing.
        """
        from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

        byte_level = _bytes_to_unicode()
        vocab = {name: i for i, name in _SPECIAL_NAMES.items()}
        vocab.update({byte_level[ord(c)]: i for c, i in self._char_to_id.items()})
        hf = tokenizers.Tokenizer(models.BPE(vocab, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens(
            [AddedToken(name, special=True, normalized=False) for name in _SPECIAL_NAMES.values()]
        )
        bos = _SPECIAL_NAMES[BOS_ID]
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, BOS_ID)]
        )
        directory = pathlib.Path(directory)
        hf.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": _SPECIAL_NAMES[EOS_ID],
            "pad_token": _SPECIAL_NAMES[PAD_ID],
            "add_bos_token": True,
            "padding_side": "left",
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte b -> the printable character byte-level BPE spells it
    with (printable Latin-1 bytes as themselves, the others from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _special_token_from_config(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # older transformers write {"content": ..., ...}
        value = value.get("content")
    return value


class HFTokenizer(_BatchMixin):
    """A Hugging Face `tokenizer.json` behind the `CharTokenizer` interface.

    Special tokens come from the arguments, else from a `tokenizer_config.json` beside the file
    (`eos_token`, `pad_token`, `bos_token`); pad defaults to EOS. Models without a BOS token
    (Qwen2) have `bos_id = None`, and `add_bos=True` then adds nothing.
    """

    def __init__(
        self,
        path: str | pathlib.Path,
        eos_token: str | None = None,
        pad_token: str | None = None,
        bos_token: str | None = None,
    ):
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.path = path
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} does not exist")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for any bad file
            raise ValueError(f"{path} is not a valid tokenizer.json: {error}") from None
        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template_path = path.with_name("chat_template.jinja")
        self.chat_template = (
            template_path.read_text(encoding="utf-8")
            if template_path.is_file()
            else config.get("chat_template")
        )
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default")
        eos_token = eos_token or _special_token_from_config(config, "eos_token")
        if eos_token is None:
            raise ValueError(f"no eos_token given and none in {config_path}")
        pad_token = pad_token or _special_token_from_config(config, "pad_token") or eos_token
        bos_token = bos_token or _special_token_from_config(config, "bos_token")
        self.eos_id = self._token_id(eos_token)
        self.pad_id = self._token_id(pad_token)
        self.bos_id = None if bos_token is None else self._token_id(bos_token)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self._special = frozenset(
            i for i, tok in self._tokenizer.get_added_tokens_decoder().items() if tok.special
        ) | {self.pad_id, self.eos_id}

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text of `messages` in the model's own Jinja chat template, ending in the
        assistant's turn (``add_generation_prompt``), rendered as transformers does (sandboxed,
        ``trim_blocks``, ``lstrip_blocks``). ``bos_token`` renders empty: `encode(add_bos=True)`
        adds the BOS id, so a template that writes it would double it.

        Raises:
          ValueError: the tokenizer directory has no chat template.
        """
        if not self.chat_template:
            raise ValueError(
                f"{self.path.parent} has no chat template (chat_template.jinja, or chat_template "
                "in tokenizer_config.json)"
            )
        import jinja2.ext
        import jinja2.sandbox

        def raise_exception(message):
            raise ValueError(f"chat template of {self.path.parent}: {message}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False, **kw)
        env.globals["raise_exception"] = raise_exception
        eos = self._tokenizer.id_to_token(self.eos_id)
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=True, bos_token="", eos_token=eos
        )

    def save(self, directory: str | pathlib.Path) -> None:
        """Copies the tokenizer's files (`HF_TOKENIZER_FILES` beside its tokenizer.json, chat
        template included) into `directory`."""
        directory = pathlib.Path(directory)
        shutil.copyfile(self.path, directory / "tokenizer.json")
        for name in HF_TOKENIZER_FILES[1:]:
            if (self.path.parent / name).is_file():
                shutil.copyfile(self.path.parent / name, directory / name)

    def _token_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in {self.path}")
        return token_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []
        return bos + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ids up to the first EOS, special tokens dropped when `skip_special`."""
        kept = _decode_ids(ids, self.eos_id, self._special, skip_special)
        return self._tokenizer.decode(kept, skip_special_tokens=False)

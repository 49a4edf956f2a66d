"""The tokenizer: byte-level BPE (Hugging Face ``tokenizers``), saved as one ``tokenizer.json``.

Byte-level means the base alphabet is the 256 byte values, so every string is encodable and
``decode(encode(x)) == x`` exactly (accents, CJK, emoji, code indentation, ``\\r\\n``): there is
no normalizer and no unknown token. The paper uses a 32k SentencePiece vocabulary; byte-level BPE
plays the same role with no unencodable text.

Special tokens, fixed ids in every tokenizer this module trains:

    <pad> = 0   padding (never inside packed training sequences)
    <bos> = 1   beginning of sequence (available to callers; prepare does not insert it)
    <eos> = 2   end of document: prepare appends it after every document before packing

``encode`` never adds BOS/EOS itself, and text that happens to contain the literal string
``<eos>`` is encoded as ordinary bytes (``encode_special_tokens``), so a document can never inject
a control token. Vocabulary presets: tiny 2048, cpu 8192, paper 32000 (`TOKENIZER_PRESETS`).

`load_tokenizer` also accepts other ``tokenizer.json`` files (e.g. GPT-2's); it then looks the
special tokens up by their usual names (``</s>``, ``<|endoftext|>`` ...).
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import SmallTalkError
from ..io import atomic_write_bytes, atomic_write_json

TOKENIZER_FILE = "tokenizer.json"
"""The tokenizer's file name wherever one is stored (data, model, trainer and bundle directories)."""

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
TOKENIZER_PRESETS = {"tiny": 2048, "cpu": 8192, "paper": 32000}
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte + the special tokens
MAX_VOCAB_SIZE = 2**31 - 1

# Names other tokenizers use for the same roles, in order of preference.
_ROLE_NAMES = {
    "eos": (EOS, "</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]"),
    "bos": (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]"),
    "pad": (PAD, "<|padding|>", "[PAD]"),
}


def check_vocab_size(vocab_size: object) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
            MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE):
        raise SmallTalkError(f"vocab_size={vocab_size!r} makes no sense for byte-level BPE: use an integer >= "
                             f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), e.g. "
                             f"{TOKENIZER_PRESETS['cpu']}")
    return vocab_size


class TextTokenizer:
    """A loaded tokenizer: encode/decode plus the ids and identity (sha256) other stages record."""

    def __init__(self, tokenizer, raw_json: bytes, path: Path | None = None):
        self._tok = tokenizer
        # Literal "<eos>" in a document is text, not a control token.
        self._tok.encode_special_tokens = True
        self.path = path
        self.sha256 = hashlib.sha256(raw_json).hexdigest()
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.eos_id = self._find("eos")
        if self.eos_id is None:
            raise SmallTalkError(f"{path or 'tokenizer'}: no end-of-document token (looked for "
                                 f"{', '.join(_ROLE_NAMES['eos'])}); train one with `smalltalk prepare`")
        bos, pad = self._find("bos"), self._find("pad")
        self.bos_id = self.eos_id if bos is None else bos
        self.pad_id = self.eos_id if pad is None else pad
        self.special_ids = frozenset(int(i) for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)

    def _find(self, role: str) -> int | None:
        for name in _ROLE_NAMES[role]:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        return None

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        return load_tokenizer(path)

    def to_json(self) -> str:
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust library."""
        # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets we never use.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: Sequence[str], dtype=np.uint32,
                         ends: Sequence[bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encode documents and join them, each followed by EOS.

        With `ends`, only the texts whose flag is True are followed by EOS: the others are pieces of a
        long document that the next text continues. Returns (tokens (sum(lengths),), lengths
        (len(texts),)) where lengths count the EOS. No Python loop per token: ids are flattened with
        ``np.fromiter`` and EOS placed with ``np.insert``.
        """
        ids = self.encode_batch(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
        eos = np.ones(len(ids), dtype=bool) if ends is None else np.asarray(ends, dtype=bool)
        tokens = np.insert(flat, np.cumsum(lengths)[eos], self.eos_id).astype(dtype, copy=False)
        return tokens, lengths + eos

    def spelling(self, token_id: int) -> str:
        """The vocabulary entry of one token id (special tokens by their name, e.g. "<eos>")."""
        return self._tok.id_to_token(int(token_id))

    def special_token_id(self, text: str) -> int | None:
        """The id of `text` when it is exactly a special token's spelling, else None (text in documents never
        becomes a control token; this answers clients that look a special token up by name)."""
        token_id = self._tok.token_to_id(text)
        return token_id if token_id in self.special_ids else None

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (pad/bos/eos) are dropped by id unless `skip_special_tokens` is False."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]}, path={self.path})"


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a ``tokenizer.json`` (HF tokenizers format)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise SmallTalkError(f"{path}: tokenizer file not found; pass a tokenizer.json or omit --tokenizer to train one")
    raw = path.read_bytes()
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises plain Exception for bad JSON / unknown models
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SmallTalkError(f"{path}: not a Hugging Face tokenizer.json ({first[:200]}); pass a file written by "
                             "`smalltalk prepare` or tokenizers' Tokenizer.save") from None
    return TextTokenizer(tokenizer, raw, path)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_file: str | Path | None = None,
                    min_frequency: int = 2, show_progress: bool = False) -> TextTokenizer:
    """Train a byte-level BPE tokenizer on `texts` and save it to `out_file` (atomically).

    The vocabulary may come out smaller than `vocab_size` when the sample is too small to learn
    that many merges; `TextTokenizer.vocab_size` is the real size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    # No normalizer: byte-level BPE must see the exact bytes for decode(encode(x)) == x.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() <= MIN_VOCAB_SIZE - 1:
        raise SmallTalkError("tokenizer training sample is empty; the corpus has no text")
    raw = tokenizer.to_str().encode("utf-8")
    if out_file is not None:
        atomic_write_bytes(out_file, raw)
    return TextTokenizer(tokenizer, raw, Path(out_file) if out_file is not None else None)


def save_pretrained_tokenizer(tokenizer_json_path: str | Path, out_dir: str | Path,
                              model_max_length: int | None = None) -> Path:
    """Write a directory that ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads offline.

    Files: ``tokenizer.json`` (copied byte for byte), ``tokenizer_config.json``, ``special_tokens_map.json``.
    """
    tok = load_tokenizer(tokenizer_json_path)
    out_dir = Path(out_dir)
    names = {role: tok._tok.id_to_token(getattr(tok, f"{role}_id")) for role in ("bos", "eos", "pad")}
    special = {f"{role}_token": name for role, name in names.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": int(model_max_length) if model_max_length else 1_000_000_000_000_000_019_884_624_838_656,
        # Exactly what smalltalk does: no BOS/EOS added, no space clean-up, "<eos>" in text is text.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "padding_side": "right",
    }
    atomic_write_bytes(out_dir / TOKENIZER_FILE, Path(tok.path).read_bytes())
    atomic_write_json(out_dir / "tokenizer_config.json", config)
    atomic_write_json(out_dir / "special_tokens_map.json", special)
    return out_dir

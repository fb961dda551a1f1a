"""Tokenizers: characters, bytes, byte-level BPE, or any `tokenizer.json`.

Every tokenizer here is a `tokenizers.Tokenizer` (the Rust library behind Hugging Face's fast
tokenizers) wrapped in `Tokenizer`, which adds named special tokens. So all of them save to and
load from one `tokenizer.json` (+ a small `tokenizer_config.json` naming bos/eos/pad), and the
files work with `transformers.PreTrainedTokenizerFast` too.

Special tokens of the tokenizers we build (GPT-2's convention, one token for both ends):
- `<|endoftext|>` id 0: eos, also bos; separates documents in packed training data;
- `<|pad|>` id 1: padding (never trained on: labels are -100 there);
- `<|unk|>` id 2: character tokenizer only, for characters absent from its corpus.
Loaded tokenizers take bos/eos/pad from `tokenizer_config.json` when present, else from
well-known names; a tokenizer without a pad token pads with eos.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torchgraft.errors import ConfigError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# (bos, eos, pad) names tried in order when a tokenizer.json comes without tokenizer_config.json
_KNOWN_BOS = ["<|begin_of_text|>", "<s>", "<bos>", "[CLS]", EOS]
_KNOWN_EOS = ["<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]"]
_KNOWN_PAD = ["<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>"]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its special tokens.

    `encode(text, add_bos=False, add_eos=False) -> list[int]`, `decode(ids) -> str` (special tokens
    skipped by default), `vocab_size`, `bos_id` / `eos_id` / `pad_id`, `save(dir)`.
    """

    def __init__(self, backend: Any, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, kind: str = "custom"):
        # an HF tokenizer.json may carry padding/truncation settings (e.g. pad every text to 128);
        # `encode` must return exactly the text's ids, so they are switched off here
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.kind = kind
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        for name, tok in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if tok is not None and backend.token_to_id(tok) is None:
                raise ConfigError(f"{name} token {tok!r} is not in the tokenizer's vocabulary")

    # ---- ids ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids (including special tokens); the model's embedding must be at least this."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        """The padding id: the pad token, else eos, else 0."""
        if self.pad_token is not None:
            return self.backend.token_to_id(self.pad_token)
        return self.eos_id if self.eos_id is not None else 0

    # ---- text <-> ids ------------------------------------------------------------------------
    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise ConfigError("add_bos=True but this tokenizer has no bos token")
            ids = [self.bos_id] + ids
        if add_eos:
            if self.eos_id is None:
                raise ConfigError("add_eos=True but this tokenizer has no eos token")
            ids = ids + [self.eos_id]
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Text -> ids. Only the bos/eos asked for are added (the tokenizer's own post-processor,
        e.g. BERT's [CLS]/[SEP], is not applied), so the same call works for every tokenizer."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        """`encode` over many texts (parallel in the Rust backend)."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- files -------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.backend.to_str()

    def fingerprint(self) -> str:
        """A short hash of the tokenizer's definition (used in data cache keys)."""
        h = hashlib.sha256(self.to_json().encode())
        h.update(json.dumps([self.bos_token, self.eos_token, self.pad_token]).encode())
        return h.hexdigest()[:16]

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory`; returns the former."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / TOKENIZER_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
               "eos_token": self.eos_token, "pad_token": self.pad_token,
               "unk_token": UNK if self.backend.token_to_id(UNK) is not None else None,
               "torchgraft_kind": self.kind}
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        return path

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r})")


# ---- builders -------------------------------------------------------------------------------------
def char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """One id per character seen in `texts` (sorted), after `<|endoftext|>`, `<|pad|>`, `<|unk|>`.

    Built as a `tokenizers` WordLevel model over single characters, so it saves as tokenizer.json.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    specials = [EOS, PAD, UNK]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for c in sorted(chars):
        if c not in vocab:
            vocab[c] = len(vocab)
    backend = Backend(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(specials)
    return Tokenizer(backend, bos_token=EOS, eos_token=EOS, pad_token=PAD, kind="char")


def _byte_level_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def byte_tokenizer() -> Tokenizer:
    """The 256 bytes (GPT-2's byte-to-unicode alphabet) plus `<|endoftext|>` and `<|pad|>`: no
    training, no unknowns, vocab 258. Byte-level BPE with zero merges."""
    from tokenizers import pre_tokenizers

    specials = [EOS, PAD]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = _byte_level_backend(vocab, [])
    backend.add_special_tokens(specials)
    return Tokenizer(backend, bos_token=EOS, eos_token=EOS, pad_token=PAD, kind="byte")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) on `texts` with `vocab_size` ids in total.

    The 256 byte symbols are always in the vocabulary, so any text encodes without unknowns.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    specials = [EOS, PAD]
    minimum = 256 + len(specials)
    if vocab_size < minimum:
        raise ConfigError(f"vocab_size {vocab_size} is too small for byte-level BPE; "
                          f"use at least {minimum} (256 bytes + {len(specials)} special tokens)")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=specials, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, bos_token=EOS, eos_token=EOS, pad_token=PAD, kind="bpe")


def train_bpe_files(files: Sequence[str | Path], vocab_size: int, out: str | Path,
                    min_frequency: int = 2, show_progress: bool = True) -> Tokenizer:
    """`torchgraft tokenizer train`: byte-level BPE over text/JSONL files (JSONL: the `text` field),
    saved into directory `out` (tokenizer.json + tokenizer_config.json)."""
    from torchgraft.data.sources import iter_documents

    paths = [Path(f) for f in files]
    if not paths:
        raise ConfigError("no training files given (e.g. `torchgraft tokenizer train corpus.txt ...`)")
    for p in paths:
        if not p.exists():
            raise ConfigError(f"training file not found: {p}")

    def texts() -> Iterable[str]:
        for p in paths:
            yield from iter_documents(str(p))

    tok = train_bpe(texts(), vocab_size, min_frequency=min_frequency, show_progress=show_progress)
    tok.save(out)
    return tok


# ---- loading --------------------------------------------------------------------------------------
def _first_present(backend: Any, names: list[str]) -> str | None:
    for n in names:
        if backend.token_to_id(n) is not None:
            return n
    return None


def _token_name(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` (or a directory holding one, e.g. a run dir, a checkpoint dir or a
    Hugging Face model dir). bos/eos/pad come from a `tokenizer_config.json` next to it when present,
    else from well-known token names."""
    from tokenizers import Tokenizer as Backend

    p = Path(path)
    if p.is_dir():
        candidates = [p / TOKENIZER_FILE, p / "tokenizer" / TOKENIZER_FILE]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"no {TOKENIZER_FILE} in {p} (train one with `torchgraft tokenizer "
                              "train` or pass tokenizer: char|byte|bpe)")
        p = found
    elif not p.is_file():
        raise ConfigError(f"tokenizer file not found: {p}")
    try:
        backend = Backend.from_file(str(p))
    except Exception as e:  # the Rust error is a plain Exception
        raise ConfigError(f"{p} is not a valid tokenizer.json: {str(e).splitlines()[0]}") from None
    cfg: dict[str, Any] = {}
    cfg_path = p.parent / CONFIG_FILE
    if cfg_path.is_file():  # a corrupt one was ignored, and with it the special tokens it names
        from torchgraft.outputs import read_input_json

        cfg = read_input_json(cfg_path, "tokenizer config", "the tokenizer_config.json saved beside tokenizer.json")
        cfg = cfg if isinstance(cfg, dict) else {}
    bos = _token_name(cfg.get("bos_token")) if "bos_token" in cfg else _first_present(backend, _KNOWN_BOS)
    eos = _token_name(cfg.get("eos_token")) if "eos_token" in cfg else _first_present(backend, _KNOWN_EOS)
    pad = _token_name(cfg.get("pad_token")) if "pad_token" in cfg else _first_present(backend, _KNOWN_PAD)
    # a config may name tokens the vocabulary lacks; drop those rather than fail on load
    bos, eos, pad = (t if t is not None and backend.token_to_id(t) is not None else None
                     for t in (bos, eos, pad))
    return Tokenizer(backend, bos_token=bos, eos_token=eos, pad_token=pad,
                     kind=str(cfg.get("torchgraft_kind", "custom")))


def from_json_str(text: str, bos_token: str | None, eos_token: str | None, pad_token: str | None,
                  kind: str = "custom") -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_json()` output and its special tokens."""
    from tokenizers import Tokenizer as Backend

    return Tokenizer(Backend.from_str(text), bos_token, eos_token, pad_token, kind)

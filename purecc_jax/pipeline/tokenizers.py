"""FluxPipeline's two tokenizers (CLIP `tokenizer/`, T5 `tokenizer_2/`) and learned concept tokens.

`tokenize` pads and truncates exactly as FluxPipeline's `encode_prompt`: CLIP to the
tokenizer's `model_max_length` (77), T5 to `max_sequence_length`, both with
`padding="max_length", truncation=True` and no attention mask.

The identifier (PureCC's `sks`) under each kind of concept embedding:

- `token` (the default): `add_concept_token(word)` adds the identifier itself to both
  tokenizers as a new *added token*, exactly as diffusers' `load_textual_inversion(file,
  token=word)` does (`tokenizer.add_tokens(word)`). Added tokens are matched before the
  BPE / unigram model runs, so `sks`, which is already one token of CLIP-L's vocabulary
  (`sks</w>`), now maps to a new id whose embedding row is learned, and the user types the
  same prompt ("a photo of sks dog") in training, in `purecc_jax.sample` and in diffusers.
  Because the token is added the same way, every prompt tokenizes the same here as in
  diffusers after loading (like any textual-inversion token there, it is also matched
  inside longer words: "masks" becomes "ma" + `sks`). The tokenizers give the token the
  next free id, which the encoders' tables need not start at (T5-XXL's table has 32128
  rows, its tokenizer 32100 entries; diffusers' loader resizes the table to 32101 and uses
  id 32100), so `tokenize` remaps the j-th concept token to `encoder_vocab_size + j`: row j
  of the encoders' `extra_embeddings` (models/text_common). The ids differ from diffusers'
  for T5, the embedding rows and so the encoder outputs do not.
  diffusers refuses a token that is already an entry of the vocabulary (`sks` is not:
  CLIP-L's entry is `sks</w>`, and T5's word-initial pieces start with `▁`), and a tokenizer whose normaliser changes the
  word (CLIP lowercases) would never match it: both are refused here, when training
  starts, rather than when the export is loaded.
- `none` / `layerwise`: the identifier stays a plain word (the DreamBooth way), read by the
  encoders as whatever its tokens mean; it may be one token or several.

`check_identifier` refuses, naming the word and the tokenizer, identifiers that no design
above can use: empty or with spaces, characters the T5 tokenizer reads as `<unk>`, and for
`none` a word of more than MAX_PLAIN_PIECES tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from absl import logging

Which = Literal["clip", "t5"]
MAX_T5_LENGTH = 512  # FluxPipeline refuses longer T5 sequences
# DreamBooth's identifiers are sequences of 1-3 rare tokens: a longer plain identifier is a
# phrase of common sub-words whose meaning the concept has to overwrite.
MAX_PLAIN_PIECES = 3


class Tokenizers:
    """The CLIP and T5 tokenizers of a FLUX pipeline plus the remapping of concept tokens.

    `clip_vocab_size` / `t5_vocab_size`: rows of the encoders' token tables (their
    configs' `vocab_size`); concept tokens are numbered from there.
    """

    def __init__(self, clip, t5, clip_vocab_size: int | None = None, t5_vocab_size: int | None = None):
        self.clip, self.t5 = clip, t5
        self.vocab_size = {"clip": clip_vocab_size or len(clip), "t5": t5_vocab_size or len(t5)}
        # Ids at or above a tokenizer's length when loaded are concept tokens added here.
        self._base = {"clip": len(clip), "t5": len(t5)}
        for which, base in self._base.items():
            if base > self.vocab_size[which]:
                raise ValueError(f"the {which} tokenizer has {base} entries, more than its encoder's "
                                 f"{self.vocab_size[which]} embedding rows")
        self.concept_words: list[str] = []

    @property
    def clip_max_length(self) -> int:
        return int(self.clip.model_max_length)

    def _tok(self, which: Which):
        if which not in ("clip", "t5"):
            raise ValueError(f"tokenizer must be 'clip' or 't5', got {which!r}")
        return self.clip if which == "clip" else self.t5

    def _remap(self, ids: np.ndarray, which: Which) -> np.ndarray:
        base, vocab = self._base[which], self.vocab_size[which]
        return np.where(ids >= base, ids - base + vocab, ids).astype(np.int32)

    def _ids(self, prompts: list[str], which: Which, length: int) -> np.ndarray:
        tok = self._tok(which)
        ids = np.asarray(tok(prompts, padding="max_length", max_length=length, truncation=True).input_ids)
        full = tok(prompts).input_ids
        for prompt, row in zip(prompts, full):
            if len(row) > length:
                logging.warning("%s tokenizer: prompt truncated to %d tokens: %r", which, length, prompt)
        return self._remap(ids, which)

    def tokenize(self, prompts: str | Sequence[str], max_sequence_length: int = MAX_T5_LENGTH
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(clip_ids (B, 77) int32, t5_ids (B, max_sequence_length) int32), as FluxPipeline tokenizes."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not 1 <= max_sequence_length <= MAX_T5_LENGTH:
            raise ValueError(f"max_sequence_length={max_sequence_length} must be in [1, {MAX_T5_LENGTH}]")
        return self._ids(prompts, "clip", self.clip_max_length), self._ids(prompts, "t5", max_sequence_length)

    def _name(self, which: Which) -> str:
        return f"{which} tokenizer ({type(self._tok(which)).__name__})"

    def check_identifier(self, word: str, kind: str = "token") -> None:
        """Raises ValueError, naming `word`, the tokenizer and what to do, if `kind` cannot use `word`.

        `kind` is the concept embedding: token | none | layerwise (see the module docstring).
        """
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"identifier {word!r} must be one non-empty word without spaces (e.g. 'sks')")
        t5 = self._tok("t5")
        ids = t5(word, add_special_tokens=False).input_ids
        if t5.unk_token_id is not None and t5.unk_token_id in ids:
            pieces = t5.convert_ids_to_tokens(ids)
            raise ValueError(f"identifier {word!r}: the {self._name('t5')} reads characters of it as "
                             f"{t5.unk_token!r} ({pieces}): without its learned token (the LoRA alone, or "
                             "concept_embedding=none) T5 could not tell it from other unknown text; use letters "
                             "and digits (e.g. 'sks')")
        if kind == "none":
            for which in ("clip", "t5"):
                pieces = self._tok(which).tokenize(word)
                if len(pieces) > MAX_PLAIN_PIECES:
                    raise ValueError(
                        f"identifier {word!r} is {len(pieces)} tokens of the {self._name(which)} ({pieces}); with "
                        f"concept_embedding=none it stays a plain word, and more than {MAX_PLAIN_PIECES} common "
                        "sub-words carry meaning the concept must overwrite: choose a rare word of 1-3 tokens "
                        "(e.g. 'sks', 'ohwx') or use concept_embedding=token")
        elif kind == "token" and word not in self.concept_words:
            for which in ("clip", "t5"):
                tok = self._tok(which)
                if word in tok.get_vocab():
                    raise ValueError(
                        f"identifier {word!r} is already an entry of the {self._name(which)}'s vocabulary; "
                        "diffusers' load_textual_inversion refuses such a token, so the exported concept token "
                        "could not be loaded: choose another identifier (e.g. 'sks', 'ohwx') or use "
                        "concept_embedding=none")
                normalizer = tok.backend_tokenizer.normalizer
                seen = normalizer.normalize_str(word) if normalizer is not None else word
                if seen != word:
                    raise ValueError(f"identifier {word!r}: the {self._name(which)} reads prompts as {seen!r}, "
                                     f"so a concept token {word!r} would never match; use {seen!r}")

    def add_concept_token(self, word: str) -> int:
        """Adds `word` to both tokenizers as one new token, as diffusers' `load_textual_inversion`
        does; returns its extra-embedding row j.

        Raises ValueError naming the word if it is already a concept token or `check_identifier`
        refuses it for `token` embeddings.
        """
        if word in self.concept_words:
            raise ValueError(f"identifier {word!r} is already a concept token of these tokenizers")
        self.check_identifier(word, "token")
        for which in ("clip", "t5"):
            # A plain string, as diffusers adds it: the same AddedToken flags, so every prompt
            # tokenizes the same here and in diffusers after loading the export.
            self._tok(which).add_tokens(word)
        self.concept_words.append(word)
        j = len(self.concept_words) - 1
        for which in ("clip", "t5"):
            if self.word_ids(word, which) != [self.vocab_size[which] + j]:
                raise ValueError(f"identifier {word!r}: the {self._name(which)} does not read it as the added token "
                                 f"({self._tok(which).tokenize(word)}); choose a lowercase word of letters and digits")
        return j

    def word_ids(self, word: str, tokenizer: Which = "t5") -> list[int]:
        """The (remapped) ids `word` tokenizes to on its own, without special tokens."""
        ids = self._tok(tokenizer)(word, add_special_tokens=False).input_ids
        return self._remap(np.asarray(ids, np.int64), tokenizer).tolist()

    def _word_edges(self, ids: np.ndarray, which: Which) -> np.ndarray:
        """(B, L) bool: T5, whether each token starts a word (`▁...`); CLIP, whether it ends one
        (`...</w>`). Special and concept tokens are words of their own: both."""
        tok = self._tok(which)
        special = set(tok.all_special_ids)
        edge = {}
        for i in np.unique(ids).tolist():
            if i >= self._base[which] or i in special:
                edge[i] = True
            else:
                piece = tok.convert_ids_to_tokens(i)
                edge[i] = piece.startswith("▁") if which == "t5" else piece.endswith("</w>")
        return np.vectorize(edge.__getitem__, otypes=[bool])(ids)

    def word_mask(self, ids: np.ndarray, word: str, tokenizer: Which = "t5") -> np.ndarray:
        """(B, L) bool: the positions of every occurrence of the word `word` in `ids` (B, L).

        An occurrence is the token sequence `word` has on its own (`word_ids`), which is how
        a space-separated word is tokenized inside a prompt, that is a whole word there: with
        real vocabularies "sks" is also the first piece of T5's "sksdog" (`▁sks d og`) and the
        last of CLIP's "redsks" (`red sks</w>`), which are not it. Rows without it are all False.
        """
        ids = np.asarray(ids)
        pattern = np.asarray(self.word_ids(word, tokenizer))
        if pattern.size == 0:
            raise ValueError(f"word {word!r} gives no {tokenizer} tokens")
        n, length = pattern.size, ids.shape[1]
        mask = np.zeros(ids.shape, bool)
        if n > length:
            return mask
        windows = np.lib.stride_tricks.sliding_window_view(ids, n, axis=1)
        hits = np.all(windows == pattern, axis=-1)  # (B, L - n + 1): an occurrence starts here
        edges = self._word_edges(ids, tokenizer)
        bounded = np.ones_like(hits)
        if tokenizer == "t5":  # the next token starts a new word
            bounded[:, :length - n] = edges[:, n:]
        else:  # the previous token ended one
            bounded[:, 1:] = edges[:, :length - n]
        hits &= bounded
        for k in range(n):
            mask[:, k:k + hits.shape[1]] |= hits
        return mask


def _encoder_vocab(folder: Path) -> int | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    raw = json.loads(config.read_text())
    return raw.get("text_config", raw).get("vocab_size")


def load_tokenizers(path: str | Path, clip_vocab_size: int | None = None, t5_vocab_size: int | None = None
                    ) -> Tokenizers:
    """The tokenizers of a diffusers FLUX folder (`tokenizer/`: CLIPTokenizer, `tokenizer_2/`: T5TokenizerFast).

    Encoder vocabulary sizes default to `text_encoder{,_2}/config.json`'s `vocab_size`.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    path = Path(path)
    for sub in ("tokenizer", "tokenizer_2"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{path} has no {sub}/ folder (a diffusers FLUX pipeline folder has one)")
    clip = CLIPTokenizer.from_pretrained(path / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(path / "tokenizer_2")
    return Tokenizers(clip, t5, clip_vocab_size or _encoder_vocab(path / "text_encoder"),
                      t5_vocab_size or _encoder_vocab(path / "text_encoder_2"))

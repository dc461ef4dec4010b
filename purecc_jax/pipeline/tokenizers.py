"""FluxPipeline's two tokenizers (CLIP `tokenizer/`, T5 `tokenizer_2/`) and learned concept tokens.

`tokenize` pads and truncates exactly as FluxPipeline's `encode_prompt`: CLIP to the
tokenizer's `model_max_length` (77), T5 to `max_sequence_length`, both with
`padding="max_length", truncation=True` and no attention mask.

Concept tokens (PureCC's identifier): `add_concept_token(word)` adds `word` to both
tokenizers as a new whole-word token. The tokenizers give it the next free id, which
the encoders' embedding tables need not start at (T5-XXL's table has 32128 rows, its
tokenizer 32100 entries), so `tokenize` remaps the j-th concept token to
`encoder_vocab_size + j`: row j of the encoders' `extra_embeddings` (models/text_common).
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

    def add_concept_token(self, word: str) -> int:
        """Adds `word` to both tokenizers as one new token; returns its extra-embedding row j.

        Raises ValueError naming the word if a tokenizer already has it as a single entry.
        """
        from transformers import AddedToken

        if not word or word.strip() != word or " " in word:
            raise ValueError(f"concept word {word!r} must be one non-empty word without spaces")
        for which in ("clip", "t5"):
            tok = self._tok(which)
            ids = tok(word, add_special_tokens=False).input_ids
            if len(ids) == 1 and ids[0] != tok.unk_token_id:
                raise ValueError(f"concept word {word!r} is already a single token of the {which} tokenizer "
                                 f"({tok.convert_ids_to_tokens(ids)[0]!r}); choose a word it splits")
        for which in ("clip", "t5"):
            # Whole words only ("asks" keeps its pieces); matched after normalisation
            # (CLIP lowercases), as the tokenizer's own words are.
            self._tok(which).add_tokens([AddedToken(word, single_word=True, normalized=True)])
        self.concept_words.append(word)
        return len(self.concept_words) - 1

    def word_ids(self, word: str, tokenizer: Which = "t5") -> list[int]:
        """The (remapped) ids `word` tokenizes to on its own, without special tokens."""
        ids = self._tok(tokenizer)(word, add_special_tokens=False).input_ids
        return self._remap(np.asarray(ids, np.int64), tokenizer).tolist()

    def word_mask(self, ids: np.ndarray, word: str, tokenizer: Which = "t5") -> np.ndarray:
        """(B, L) bool: the positions of every occurrence of `word`'s tokens in `ids` (B, L).

        An occurrence is the token sequence `word` has on its own (`word_ids`), which is how
        a space-separated word is tokenized inside a prompt. Rows without it are all False.
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

"""Word-level tokenizers for the toy world, built in code and saved in the diffusers layout.

CLIP: a BPE vocabulary of single characters (so any word can be spelled) plus merges that
build every world word into one token. T5: a Unigram model with one piece per word and
per character. Both are real transformers tokenizers (`CLIPTokenizer`, `T5TokenizerFast`)
that `pipeline.tokenizers.load_tokenizers` reads like FLUX.1's own.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

CHARS = tuple(string.ascii_lowercase + string.digits)


def clip_tokenizer(words: Sequence[str], max_length: int):
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in CHARS:
            vocab[c + suffix] = len(vocab)
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the largest id, as in CLIP (pooled at the argmax)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(words: Sequence[str]):
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in words]
    for c in CHARS:
        pieces += [(c, -3.0), ("▁" + c, -3.5)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def save(folder: Path, words: Sequence[str], clip_max_length: int) -> tuple[int, int]:
    """Writes `tokenizer/` and `tokenizer_2/` under `folder`; returns their sizes (CLIP, T5)."""
    clip, t5 = clip_tokenizer(words, clip_max_length), t5_tokenizer(words)
    clip.save_pretrained(folder / "tokenizer")
    t5.save_pretrained(folder / "tokenizer_2")
    return len(clip), len(t5)

"""FLUX.1's two tokenizers from real vocabularies, built offline, and a tiny pipeline that uses them.

CLIP-L (`tokenizer/`): OpenAI CLIP's byte-level BPE, read from the merges file that the
open-clip-torch wheel ships (`open_clip/bpe_simple_vocab_16e6.txt.gz`; installed with
`pip install --no-deps -r requirements-nodeps.txt`, since its dependencies pull
torchvision). CLIP-L's tokenizer is that BPE cut to its first 49152 - 256 - 2 merges, as
CLIP's `SimpleTokenizer` does: vocabulary = the 256 byte characters, the same with `</w>`,
one entry per merge, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407): 49408
entries. It is written in the diffusers layout (vocab.json, merges.txt, special tokens,
model_max_length 77) and read by transformers' CLIPTokenizer, as FLUX.1-dev's own.

T5 (`tokenizer_2/`): a SentencePiece unigram model trained here on a small corpus in which
the identifiers `sks` and `ohwx` are whole pieces (`▁sks`), with T5's special ids (pad 0,
eos 1, unk 2) and 100 `<extra_id_*>` sentinels after the pieces (the last id is
`<extra_id_0>`, as in T5), written as `spiece.model` and converted by transformers'
T5TokenizerFast, as FLUX.1-dev's `tokenizer_2/`.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import io
import json
import random
import shutil
from pathlib import Path

import pipeline_reference

CLIP_MERGES = 49152 - 256 - 2  # CLIP's SimpleTokenizer keeps this many merges of the file
CLIP_VOCAB = 49408
T5_EXTRA_IDS = 100
IDENTIFIERS = ("sks", "ohwx")
# Words of the prompts the tests use; every other word is spelled from pieces of these.
CORPUS_WORDS = ("a photo of dog cat on the beach in jungle snow red blue green grass sitting wearing hat toy "
                "with an and at city night is playing floating water bowl purple rainbow scarf chef outfit "
                "police sleeping table wooden floor mountain background top street cube shaped wet bucket "
                "shiny sand pink fabric orange yellow black white forest field flowers garden house car tree "
                "riding rocket moon sky over under near behind front masks desks").split()
# Capitals, digits and punctuation, so that only characters outside these read as <unk>.
CORPUS_EXTRA = ("The Quick Brown Fox jumps over the Lazy Dog, 0123456789 times! Is it? Yes - it's (very) good; "
                "pack my box with five dozen liquor jugs.")


def open_clip_bpe() -> Path:
    """The BPE merges file of the installed open_clip package, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: the real CLIP-L vocabulary comes from its wheel; "
                                "run `pip install --no-deps -r requirements-nodeps.txt`")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps -r requirements-nodeps.txt`")
    return path


def byte_characters() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 bytes, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def clip_l_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-L's vocabulary (49408 entries) and merges, from open_clip's BPE file."""
    lines = gzip.open(open_clip_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:CLIP_MERGES + 1]]  # line 0 is the version header
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path) -> Path:
    """CLIP-L's tokenizer in the diffusers `tokenizer/` layout."""
    vocab, merges = clip_l_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                    unk_token="<|endoftext|>")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        specials, tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True, errors="replace",
        add_prefix_space=False, clean_up_tokenization_spaces=True), indent=2))
    return folder


def t5_corpus(seed: int = 0, sentences: int = 4000) -> list[str]:
    """Sentences of CORPUS_WORDS in which each identifier is as frequent as three ordinary words."""
    rng = random.Random(seed)
    pool = list(CORPUS_WORDS) + [w for w in IDENTIFIERS for _ in range(3)]
    return [" ".join(rng.choice(pool) for _ in range(8)) for _ in range(sentences)] + [CORPUS_EXTRA] * 20


def train_t5_sentencepiece() -> bytes:
    """A unigram SentencePiece model (serialized) with T5's special ids, trained on `t5_corpus`."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t5_corpus()), model_writer=model, model_type="unigram", vocab_size=400,
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    return model.getvalue()


def write_t5_tokenizer(folder: Path) -> Path:
    """The trained unigram model in the diffusers `tokenizer_2/` layout (spiece.model + tokenizer.json)."""
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(train_t5_sentencepiece())
    specials = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        specials, tokenizer_class="T5Tokenizer", extra_ids=T5_EXTRA_IDS, model_max_length=512, legacy=True), indent=2))
    T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)  # adds tokenizer.json, as FLUX.1 ships
    return folder


def load_clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def load_t5_tokenizer(folder: Path):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(folder)


def build_pipeline(tokenizers: Path, seed: int = 0):
    """`pipeline_reference.build_pipeline`'s tiny FluxPipeline with the tokenizers under `tokenizers`
    (tokenizer/, tokenizer_2/) and text encoders whose tables fit them (T5's larger, as T5-XXL's)."""
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel

    pipe = pipeline_reference.build_pipeline(guidance_embeds=True, seed=seed)
    clip_tok, t5_tok = load_clip_tokenizer(tokenizers / "tokenizer"), load_t5_tokenizer(tokenizers / "tokenizer_2")
    clip_cfg, t5_cfg = copy.deepcopy(pipe.text_encoder.config), copy.deepcopy(pipe.text_encoder_2.config)
    clip_cfg.vocab_size = len(clip_tok)
    t5_cfg.vocab_size = len(t5_tok) + pipeline_reference.T5_TABLE_PADDING
    components = dict(pipe.components, tokenizer=clip_tok, tokenizer_2=t5_tok,
                      text_encoder=CLIPTextModel(clip_cfg).eval(), text_encoder_2=T5EncoderModel(t5_cfg).eval())
    return FluxPipeline(**components)


def save_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny diffusers FLUX.1-dev-style folder whose tokenizers are the real-vocabulary ones."""
    scratch = folder / "_tokenizers"
    write_clip_tokenizer(scratch / "tokenizer")
    write_t5_tokenizer(scratch / "tokenizer_2")
    build_pipeline(scratch, seed).save_pretrained(folder, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):  # the layout as written above, not as save_pretrained rewrites it
        shutil.rmtree(folder / sub)
        shutil.move(scratch / sub, folder / sub)
    scratch.rmdir()
    return folder

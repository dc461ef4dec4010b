"""Concept identifiers with FLUX.1's real tokenizer vocabularies (tests/real_tokenizers.py).

`sks` and `ohwx` are single tokens of CLIP-L's vocabulary (`sks</w>`) and whole pieces of the
T5 model trained here (`▁sks`). The tests check the tokenizers against facts of the real
ones, the identifier rules of `Tokenizers.check_identifier` / `texts.check_identifier`, that
the package tokenizes prompts as diffusers does after `load_textual_inversion`, and, on a
tiny FLUX folder with these tokenizers, the README's FLUX.1-dev command line end to end and
diffusers loading its export: prompt embeddings and transformer output equal this package's.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import config_files
import dreambench_standin
import flux_reference
import pipeline_reference
import real_tokenizers
import tiny_runs
from tiny_runs import compilation_cache  # noqa: F401  (the module's autouse fixture)
from purecc_jax import main as main_lib
from purecc_jax import train
from purecc_jax import trained as trained_lib
from purecc_jax.backbones.flux.folder import load_pipeline
from purecc_jax.backbones.flux.generate import trained_overrides
from purecc_jax.data import texts as texts_lib
from purecc_jax.models.flux import FluxTransformer
from purecc_jax.pipeline.settings import SampleSettings
from purecc_jax.pipeline.tokenizers import MAX_PLAIN_PIECES, load_tokenizers
from purecc_jax.purecc import loop

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = ROOT / "configs" / "flux_concept.py"
README = ROOT / "README.md"
L = 16  # T5 tokens
README_PROMPT = "a photo of {identifier} dog on the beach"

# The README's command shrunk to the tiny folder: what the command line leaves at the defaults.
TINY = tiny_runs.tiny(**{
    "stage_a.steps": 2, "stage_b.steps": 2, "stage_a.learning_rate": 1e-2, "stage_b.learning_rate": 1e-2,
    "stage_a.embedding_learning_rate": 1e-1, "checkpoint_every": 2, "sample.prompts": (),
})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny diffusers FLUX.1-dev-style folder whose tokenizers are the real-vocabulary ones."""
    return real_tokenizers.save_pipeline(tmp_path_factory.mktemp("real_vocab_flux"))


def fresh(folder):
    """Tokenizers of `folder` that a test may add tokens to."""
    return load_tokenizers(folder)


# ----------------------------------------------------------------------------- the tokenizers


def test_clip_tokenizer_is_clip_l(folder):
    tok = fresh(folder).clip
    vocab, merges = real_tokenizers.clip_l_vocab_and_merges()
    assert len(tok) == len(vocab) == real_tokenizers.CLIP_VOCAB == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    # CLIP's ids of "a photo of a cat" / "... a dog", as every CLIP-L tokenizer gives them.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A Photo of a  DOG").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    # The first merge of the file is "i n": the first id after the 512 byte entries.
    assert merges[0] == ("i", "n") and tok.convert_tokens_to_ids("in") == 512
    assert tok.convert_tokens_to_ids("a</w>") == 256 + real_tokenizers.byte_characters().index("a")
    for word in real_tokenizers.IDENTIFIERS:  # why the old rule ("choose a word it splits") refused them
        assert tok.tokenize(word) == [word + "</w>"] and word not in tok.get_vocab()
    assert tok.tokenize("a photo of sks dog") == ["a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]
    assert tok("a photo of sks dog").input_ids[4] == vocab["sks</w>"] == 48136


def test_t5_tokenizer_is_the_sentencepiece_model(folder):
    import sentencepiece as spm

    tok = fresh(folder).t5
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer_2" / "spiece.model"))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == sp.get_piece_size() + real_tokenizers.T5_EXTRA_IDS
    assert tok.convert_tokens_to_ids("<extra_id_0>") == len(tok) - 1  # T5's sentinels count down from the end
    for text in ("a photo of sks dog on the beach", "ohwx cat, wearing a red hat!", "The Lazy Dog (2024)",
                 "a photo of masks", "sks's toy; 42 times"):
        assert tok(text).input_ids == sp.encode(text) + [1], text
    for word in real_tokenizers.IDENTIFIERS:
        assert tok.tokenize(word) == ["▁" + word] and word not in tok.get_vocab()


def test_missing_vocabulary_is_an_error_not_a_skip(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="requirements-nodeps.txt"):
        real_tokenizers.open_clip_bpe()


# ----------------------------------------------------------------------------- identifiers


@pytest.mark.parametrize("word", real_tokenizers.IDENTIFIERS)
def test_identifier_becomes_one_added_token(folder, word):
    tok = fresh(folder)
    assert tok.add_concept_token(word) == 0
    clip_row, t5_row = tok.vocab_size["clip"], tok.vocab_size["t5"]
    assert t5_row == len(tok.t5) - 1 + pipeline_reference.T5_TABLE_PADDING  # T5's table is larger
    assert tok.word_ids(word, "clip") == [clip_row] and tok.word_ids(word, "t5") == [t5_row]
    prompt = README_PROMPT.format(identifier=word)
    clip_ids, t5_ids = tok.tokenize([prompt, "a photo of dog on the beach"], L)
    # The identifier's one token replaces its vocabulary token; nothing else changes.
    plain = fresh(folder).tokenize([prompt], L)
    assert list(clip_ids[0, :8]) == [49406, 320, 1125, 539, clip_row, 1929, 525, 518]
    np.testing.assert_array_equal(np.delete(clip_ids[0], 4), np.delete(plain[0][0], 4))
    np.testing.assert_array_equal(np.delete(t5_ids[0], 3), np.delete(plain[1][0], 3))
    assert t5_ids[0, 3] == t5_row
    np.testing.assert_array_equal(tok.word_mask(t5_ids, word)[:, :5], [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(tok.word_mask(clip_ids, word, "clip")[0, :6], [0, 0, 0, 0, 1, 0])


PROMPTS = ["a photo of sks dog on the beach", "sks, sks. SKS dog", "a photo of a dog", "a dog wearing masks",
           "sks's toy in the jungle"]


def test_tokenization_equals_diffusers_after_load_textual_inversion(folder):
    """Every prompt gives diffusers' ids after its loader added the token (T5's new id remapped)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        row = torch.zeros(1, encoder.get_input_embeddings().weight.shape[1])
        pipe.load_textual_inversion({"sks": row}, token="sks", text_encoder=encoder, tokenizer=tokenizer)
    tok = fresh(folder)
    tok.add_concept_token("sks")
    clip_ids, t5_ids = tok.tokenize(PROMPTS, L)
    want_clip = pipe.tokenizer(pipe.maybe_convert_prompt(PROMPTS, pipe.tokenizer), padding="max_length",
                               max_length=77, truncation=True).input_ids
    want_t5 = np.asarray(pipe.tokenizer_2(pipe.maybe_convert_prompt(PROMPTS, pipe.tokenizer_2), padding="max_length",
                                          max_length=L, truncation=True).input_ids)
    np.testing.assert_array_equal(clip_ids, want_clip)
    new_t5 = len(pipe.tokenizer_2) - 1  # diffusers' id; ours is the first row after the T5 table
    np.testing.assert_array_equal(t5_ids, np.where(want_t5 == new_t5, tok.vocab_size["t5"], want_t5))
    assert (want_t5 == new_t5).sum() == 5 and (t5_ids == tok.vocab_size["t5"]).sum() == 5  # "SKS": T5 keeps case


@pytest.mark.parametrize("word, kind, message", [
    ("", "token", "non-empty word without spaces"),
    ("sks dog", "none", "non-empty word without spaces"),
    ("sks{", "token", r"t5 tokenizer \(T5Tokenizer\) reads characters of it as '<unk>'"),
    ("s€ks", "none", "reads characters of it as '<unk>'"),
    ("Tks", "token", r"clip tokenizer \(CLIPTokenizer\) reads prompts as 'tks'"),
    ("photo", "token", "already an entry of the clip tokenizer .*load_textual_inversion refuses"),
    ("zqxjvkwy", "none", f"tokens of the clip tokenizer .*more than {MAX_PLAIN_PIECES}"),
])
def test_identifier_errors(folder, word, kind, message):
    with pytest.raises(ValueError, match=message) as e:
        fresh(folder).check_identifier(word, kind)
    assert repr(word) in str(e.value)


def test_identifier_rules_per_kind(folder):
    tok = fresh(folder)
    for word in real_tokenizers.IDENTIFIERS:
        for kind in ("none", "layerwise", "token"):
            tok.check_identifier(word, kind)
    tok.check_identifier("photo", "none")  # a plain word may be anything the tokenizers read
    tok.check_identifier("zqxjvkwy", "layerwise")  # the vectors go to all of its tokens
    assert len(tok.clip.tokenize("zqxjvkwy")) > MAX_PLAIN_PIECES
    tok.add_concept_token("sks")
    with pytest.raises(ValueError, match="'sks' is already a concept token"):
        tok.add_concept_token("sks")


@pytest.mark.parametrize("identifier, class_word", [("dog", "dog"), ("Bear", "teddy bear")])
def test_identifier_equal_to_the_class_word(identifier, class_word):
    with pytest.raises(ValueError, match=f"identifier {identifier!r} is a word of the class word"):
        texts_lib.check_identifier(identifier, class_word)
    with pytest.raises(ValueError, match="is a word of the class word"):
        texts_lib.from_template(identifier, class_word)


def test_plain_identifier_mask_with_real_tokenizers(folder):
    """concept_embedding=none / layerwise: the identifier's tokens, one or several, where it is a whole word."""
    tok = fresh(folder)
    assert tok.t5.tokenize("sksdog") == ["▁sks", "d", "og"] and tok.clip.tokenize("redsks") == ["red", "sks</w>"]
    prompts = ["a photo of sks dog", "sks on the beach, sks", "a photo of sksdog redsks", "a photo of masks"]
    clip_ids, t5_ids = tok.tokenize(prompts, L)
    for ids, which in ((t5_ids, "t5"), (clip_ids, "clip")):
        assert tok.word_mask(ids, "sks", which).sum(axis=1).tolist() == [1, 2, 0, 0], which
        pieces = tok.word_ids("sksdog", which)
        assert 1 < len(pieces) <= MAX_PLAIN_PIECES
        got = tok.word_mask(ids, "sksdog", which)
        assert got.sum(axis=1).tolist() == [0, 0, len(pieces), 0] and list(ids[2][got[2]]) == pieces, which
    tok.add_concept_token("sks")  # one added token: "sksdog" and "redsks" hold it now, as in diffusers
    clip_ids, t5_ids = tok.tokenize(prompts, L)
    for ids, which in ((t5_ids, "t5"), (clip_ids, "clip")):
        assert tok.word_mask(ids, "sks", which).sum(axis=1).tolist() == [1, 2, 2, 1], which


# ----------------------------------------------------------------------------- the README's command


def readme_command() -> list[str]:
    """The arguments of the `python -m purecc_jax.main` line in the README's FLUX.1-dev section."""
    text = README.read_text()
    start = text.index("## Customizing FLUX.1-dev")
    section = text[start:text.find("\n## ", start + 1)]
    blocks = [b.replace("\\\n", " ") for b in re.findall(r"```bash\n(.*?)```", section, re.S)]
    lines = [line for b in blocks for line in b.splitlines() if line.strip().startswith("python -m purecc_jax.main")]
    assert len(lines) == 1, f"README's FLUX.1-dev section should have one `python -m purecc_jax.main` line: {lines}"
    args = shlex.split(lines[0], comments=True)
    assert args[:3] == ["python", "-m", "purecc_jax.main"]
    return args[3:]


def readme_argv(folder: Path, photos: Path, workdir: Path) -> list[str]:
    """The README's command with the tiny folder, a folder of photos and a workdir put in."""
    replace = {"--workdir": str(workdir), "--config.pretrained": str(folder), "--config.concept.path": str(photos)}
    argv, seen = ["main"], set()
    for arg in readme_command():
        name, _, value = arg.partition("=")
        if name == "--config":
            value = str(ROOT / value)
        seen.add(name)
        argv.append(f"{name}={replace.get(name, value)}")
    assert set(replace) | {"--config"} <= seen, f"the README's command lacks one of {sorted(replace)}: {argv}"
    assert "--config.concept.class_word" in seen
    return argv + [f"--config.{k}={v}" for k, v in TINY.items()] + ["--nocompilation_cache"]


def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("my_dog")
    for image in sorted((dreambench_standin.root() / "dog").glob("*.jpg"))[:3]:
        shutil.copy(image, folder / image.name)
    return folder


def run_cli(argv: list[str]):
    saved = {n: getattr(jax.config, n) for n in tiny_runs.CACHE_OPTIONS}
    try:
        return main_lib.cli(argv)
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


@pytest.fixture(scope="module")
def readme_run(folder, tmp_path_factory):
    """The README's FLUX.1-dev command line (its identifier, class word and embedding mode), in process."""
    workdir = tmp_path_factory.mktemp("readme") / "runs_dog"
    run_cli(readme_argv(folder, photos(tmp_path_factory), workdir))
    return workdir


@pytest.fixture(scope="module")
def ohwx_run(folder, tmp_path_factory):
    """The same command with `--config.concept.identifier=ohwx`."""
    workdir = tmp_path_factory.mktemp("ohwx") / "runs_dog"
    run_cli(readme_argv(folder, photos(tmp_path_factory), workdir) + ["--config.concept.identifier=ohwx"])
    return workdir


def test_readme_command_runs_on_the_real_tokenizers(readme_run):
    config = json.loads((readme_run / "config.json").read_text())
    assert (config["concept"]["identifier"], config["concept"]["class_word"]) == ("sks", "dog")
    assert config["concept_embedding"] == "token" and config["method"] == "purecc"
    for stage in ("stage_a", "stage_b"):
        rows = loop.read_metrics(readme_run / stage)
        assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    meta = json.loads((readme_run / "export" / "purecc.json").read_text())
    assert (meta["identifier"], meta["concept_embedding"]) == ("sks", "token")
    assert all((readme_run / "export" / f).is_file() for f in meta["files"])


@pytest.mark.parametrize("run", ["readme_run", "ohwx_run"])
def test_export_loads_in_diffusers_with_the_same_prompt(run, folder, request):
    """The README's prompt through diffusers' own loaders on the export and through what
    `purecc_jax.sample --workdir` loads: T5 and pooled CLIP embeddings and the transformer's
    output on them are equal (fp32)."""
    from diffusers import FluxPipeline

    workdir = request.getfixturevalue(run)
    export = workdir / "export"
    word = json.loads((export / "purecc.json").read_text())["identifier"]
    prompts = [README_PROMPT.format(identifier=word), "a photo of a dog on the beach"]

    pipe = FluxPipeline.from_pretrained(folder)
    pipe.load_lora_weights(export)
    pipe.load_textual_inversion(export / "concept_clip_l.safetensors", token=word,
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(export / "concept_t5.safetensors", token=word,
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    pipe.text_encoder.eos_token_id = pipe.tokenizer.eos_token_id  # the README's line
    with torch.no_grad():
        t5_want, pooled_want, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=L)

    # What `python -m purecc_jax.sample --workdir=W --prompt=...` computes for the same prompts.
    parts, trained = trained_lib.load_trained(workdir, load_pipeline(folder))
    ours = trained_overrides(parts, prompts, SampleSettings(max_sequence_length=L), trained)
    assert parts.tokenizers.concept_words == [word] and ours["concept"] is None
    for got, want in ((ours["text"].t5, t5_want), (ours["text"].pooled, pooled_want)):
        want = want.numpy()
        assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()
    init = parts.text.t5_params["token_embedding"][parts.tokenizers.word_ids("dog", "t5")[0]]
    assert np.abs(np.asarray(trained.embeddings["t5"][0]) - np.asarray(init)).max() > 1e-3  # stage A trained it

    cfg = parts.transformer_config
    inputs = flux_reference.random_inputs(cfg, batch=2, h=2, w=2, text_len=L, seed=1)
    inputs.update(txt=t5_want.numpy(), pooled=pooled_want.numpy())
    want = flux_reference.run_torch(pipe.transformer, inputs)
    inputs.update(txt=ours["text"].t5, pooled=ours["text"].pooled)
    got = FluxTransformer(cfg).apply({"params": parts.transformer_params, "lora": ours["lora"]},
                                     **{k: None if v is None else jnp.asarray(v) for k, v in inputs.items()})
    assert np.abs(np.asarray(got) - want).max() <= 1e-4 * np.abs(want).max()
    base = flux_reference.run_torch(FluxPipeline.from_pretrained(folder).transformer, inputs | {
        "txt": t5_want.numpy(), "pooled": pooled_want.numpy()})
    assert np.abs(want - base).max() > 1e-3 * np.abs(want).max()  # the LoRA matters beyond the tolerance


# ----------------------------------------------------------------------------- errors fire early


def flux_config(folder: Path, photos_folder: Path, **overrides):
    """configs/flux_concept.py with the tiny folder, `photos_folder`, TINY and `overrides` (dotted keys)."""
    values = {"pretrained": str(folder), "concept.path": str(photos_folder), "concept.class_word": "dog", **TINY}
    return config_files.load("flux_concept", {**values, **overrides})


@pytest.mark.parametrize("overrides, caption, message", [
    ({}, "a photo of sks dog wearing masks", r"'sks' inside \['masks'\]; with concept_embedding=token"),
    ({"concept.identifier": "Tks"}, None, "reads prompts as 'tks'"),
    ({"concept.identifier": "zqxjvkwy", "concept_embedding": "none"}, None, "more than 3"),
    ({"concept.identifier": "photo"}, None, "already an entry of the clip tokenizer"),
])
def test_trainer_refuses_identifiers_before_encoding_anything(folder, tmp_path_factory, monkeypatch, overrides,
                                                              caption, message):
    concept = photos(tmp_path_factory)
    if caption:
        (concept / sorted(concept.iterdir())[0].with_suffix(".txt").name).write_text(caption)

    def build_cache(self):
        raise AssertionError("the concept cache was built before the identifier was checked")

    monkeypatch.setattr(train.Trainer, "_build_cache", build_cache)
    with pytest.raises(ValueError, match=message):
        main_lib.run(flux_config(folder, concept, **overrides), tmp_path_factory.mktemp("refused"))


def test_identifier_equal_to_the_class_word_fails_before_loading(folder, tmp_path_factory, monkeypatch):
    from purecc_jax.backbones.flux import folder as folder_lib

    def load_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the config was validated")

    monkeypatch.setattr(folder_lib, "load_pipeline", load_pipeline)
    config = flux_config(folder, photos(tmp_path_factory), **{"concept.identifier": "dog"})
    with pytest.raises(ValueError, match="identifier 'dog' is a word of the class word 'dog'"):
        main_lib.run(config, tmp_path_factory.mktemp("refused"))

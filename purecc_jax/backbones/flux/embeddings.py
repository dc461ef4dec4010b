"""Learned concept embeddings (docs/method.md §3).

    none       no embedding; the identifier is a plain word, whatever its tokens mean to the
               encoders (one token or a few)
    token      the identifier becomes one added token of both tokenizers
               (`Tokenizers.add_concept_token`, as diffusers' textual-inversion loader adds
               it) with one new row in the CLIP-L and one in the T5 embedding table
               ({"clip": (1, D_clip), "t5": (1, D_t5)}), read through the encoders'
               `extra_embeddings`; initialised from the class word's token embeddings
    layerwise  one vector per transformer block ({"double": (depth, D), "single":
               (depth_single, D)}) written into the context stream at the identifier's T5
               token positions (all of its tokens when the plain word is several) at each
               block's input; initialised from the pretrained model's own context stream
               there, so training starts from the pretrained behaviour

In an export folder (`write_embeddings`, `read_embeddings`): token rows as
`concept_clip_l.safetensors` / `concept_t5.safetensors`, each one (1, D) float32 tensor named by
the identifier (what diffusers' `load_textual_inversion` reads); layer-wise vectors as
`concept_layerwise.safetensors` with "double" (depth, D) and "single" rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from purecc_jax.backbones.flux.folder import FluxParts
from purecc_jax.backbones.flux.text import TextEmbeddings, TextEncoders
from purecc_jax.models.flux import ConceptInjection, FluxTransformer
from purecc_jax.pipeline import flow
from purecc_jax.weights.safetensors_io import SafetensorsFile, save_file

KINDS = ("none", "token", "layerwise")
FILES = {"token": ("concept_clip_l.safetensors", "concept_t5.safetensors"),
         "layerwise": ("concept_layerwise.safetensors",)}


def init_token(clip_table: jax.Array, t5_table: jax.Array, clip_class_ids: np.ndarray,
               t5_class_ids: np.ndarray) -> dict[str, jax.Array]:
    """Rows initialised to the mean embedding of the class word's tokens in each table."""
    if len(clip_class_ids) == 0 or len(t5_class_ids) == 0:
        raise ValueError("the class word tokenizes to no tokens; cannot initialise the concept token")
    return {
        "clip": jnp.mean(jnp.asarray(clip_table, jnp.float32)[np.asarray(clip_class_ids)], axis=0, keepdims=True),
        "t5": jnp.mean(jnp.asarray(t5_table, jnp.float32)[np.asarray(t5_class_ids)], axis=0, keepdims=True),
    }


def init_layerwise(model: FluxTransformer, variables: dict[str, Any], inputs: dict[str, jax.Array],
                   ident_mask: jax.Array) -> dict[str, jax.Array]:
    """Mean context-stream value at the identifier's positions at every block input.

    `inputs` are FluxTransformer keyword arguments for a batch whose texts contain the
    identifier where `ident_mask` (B, T) is true.
    """
    cfg = model.config
    if not bool(jnp.any(ident_mask)):
        raise ValueError("the identifier occurs in none of the texts; cannot initialise layer-wise embeddings")
    # An all-false injection changes nothing but makes the single blocks record the text part.
    probe = ConceptInjection(jnp.zeros_like(ident_mask), jnp.zeros((cfg.depth, cfg.hidden_size)),
                             jnp.zeros((cfg.depth_single, cfg.hidden_size)))
    # One compiled forward pass, not one dispatch per operation.
    forward = jax.jit(lambda v, x, c: model.apply(v, **x, concept=c, mutable=["intermediates"]))
    _, state = forward(variables, inputs, probe)
    inter = state["intermediates"]
    weights = ident_mask.astype(jnp.float32)

    def mean_at_identifier(ctx):  # (L, B, T, D) -> (L, D)
        return jnp.einsum("lbtd,bt->ld", ctx.astype(jnp.float32), weights) / jnp.sum(weights)

    def collect(prefix, depth):
        if prefix in inter:  # scanned: one stacked array
            return mean_at_identifier(inter[prefix]["context"][0])
        return jnp.stack([mean_at_identifier(inter[f"{prefix}_{i}"]["context"][0][None])[0] for i in range(depth)])

    return {"double": collect("double_blocks", cfg.depth), "single": collect("single_blocks", cfg.depth_single)}


def embed_prompts(text: TextEncoders, prompts: Sequence[str], max_sequence_length: int, kind: str,
                  identifier: str, embeddings: dict[str, Any] | None
                  ) -> tuple[TextEmbeddings, ConceptInjection | None]:
    """Text embeddings of `prompts` under learned concept embeddings, and the layer-wise injection.

    token: the identifier must already be a concept token of `text.tokenizers`
    (`add_concept_token`); its rows are passed to the encoders. layerwise: the vectors are
    written at the identifier's T5 positions. none, or no embeddings: the plain encoding.
    """
    if kind not in KINDS:
        raise ValueError(f"concept embedding kind {kind!r} is not one of {KINDS}")
    tok = text.tokenizers
    use_rows = kind == "token" and embeddings is not None
    if use_rows and identifier not in tok.concept_words:
        raise ValueError(f"token embeddings for {identifier!r}, but the tokenizers do not have it as a concept "
                         "token; call tokenizers.add_concept_token first")
    clip_ids, t5_ids = tok.tokenize(list(prompts), max_sequence_length)
    out = text.encode(clip_ids, t5_ids, embeddings["clip"] if use_rows else None,
                      embeddings["t5"] if use_rows else None)
    injection = None
    if kind == "layerwise" and embeddings is not None:
        mask = jnp.asarray(tok.word_mask(np.asarray(t5_ids), identifier))
        injection = ConceptInjection(mask, embeddings["double"], embeddings["single"])
    return out, injection


def write_embeddings(folder: str | Path, kind: str, identifier: str, embeddings: dict[str, Any] | None
                     ) -> list[Path]:
    """Writes the learned concept embeddings of `kind` into `folder`; returns the files written.

    token: `concept_clip_l.safetensors` / `concept_t5.safetensors`, each one (1, D) float32
    tensor named by the identifier (what diffusers' `load_textual_inversion` reads);
    layerwise: `concept_layerwise.safetensors` with "double" (depth, D) and "single" rows.
    """
    folder = Path(folder)
    if embeddings is None or kind == "none":
        return []
    if kind == "token":
        files = []
        for key, name in zip(("clip", "t5"), FILES["token"]):
            save_file({identifier: np.asarray(jax.device_get(embeddings[key]), np.float32)}, folder / name)
            files.append(folder / name)
        return files
    if kind == "layerwise":
        (name,) = FILES["layerwise"]
        save_file({k: np.asarray(jax.device_get(v), np.float32) for k, v in embeddings.items()}, folder / name)
        return [folder / name]
    raise ValueError(f"unknown concept_embedding {kind!r}: expected none, token or layerwise")


def _tensors(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    """The named float32 tensors of a safetensors file, each checked against its expected shape."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the export's concept embeddings are missing")
    st = SafetensorsFile(path)
    out = {}
    for key, shape in expected.items():
        if key not in st.entries:
            raise ValueError(f"{path}: no tensor {key!r} (has {sorted(st.keys())})")
        out[key] = jnp.asarray(np.asarray(st.get(key), np.float32))
        if out[key].shape != shape:
            raise ValueError(f"{path}: {key!r} has shape {out[key].shape}; this pipeline needs {shape}")
    return out


def read_embeddings(folder: str | Path, kind: str, identifier: str, parts: FluxParts) -> dict[str, Any] | None:
    """Inverse of `write_embeddings`, checked against `parts`' encoders and transformer.

    With token embeddings the identifier is added to `parts`' tokenizers (in place) as a
    concept token, as in training, so that prompts naming it read the learned rows.
    """
    folder = Path(folder)
    if kind == "none":
        return None
    if kind == "token":
        text = parts.text
        clip_file, t5_file = (folder / n for n in FILES["token"])
        rows = {"clip": _tensors(clip_file, {identifier: (1, text.clip_config.hidden_size)})[identifier],
                "t5": _tensors(t5_file, {identifier: (1, text.t5_config.d_model)})[identifier]}
        if identifier not in parts.tokenizers.concept_words:
            parts.tokenizers.add_concept_token(identifier)
        return rows
    if kind == "layerwise":
        cfg = parts.transformer_config
        (name,) = FILES["layerwise"]
        return _tensors(folder / name, {"double": (cfg.depth, cfg.hidden_size),
                                        "single": (cfg.depth_single, cfg.hidden_size)})
    raise ValueError(f"{folder}: unknown concept_embedding {kind!r}")


def initial(parts: FluxParts, kind: str, class_word: str, cache: Any, seed: int,
            guidance: float | None) -> dict[str, jax.Array] | None:
    """The starting values of `kind`'s embeddings for a concept of `class_word` (see the module doc).

    layerwise reads the pretrained model's context stream on up to 8 cached views at t = 0.5
    (`cache`: the concept cache, `seed`: their noise, `guidance`: the training guidance).
    """
    if kind == "none":
        return None
    if kind == "token":
        tok, text = parts.tokenizers, parts.text
        return init_token(text.clip_params["token_embedding"], text.t5_params["token_embedding"],
                          tok.word_ids(class_word, "clip"), tok.word_ids(class_word, "t5"))
    if kind != "layerwise":
        raise ValueError(f"concept embedding kind {kind!r} is not one of {KINDS}")
    a = cache.arrays
    views = np.arange(min(cache.n_views, 8))
    text_idx = np.asarray([cache.view_texts["complete"][v] for v in views])
    x0 = jnp.asarray(a["latents"][views])
    t = jnp.full((len(views),), 0.5)
    xt = flow.noisy(x0, jax.random.normal(jax.random.key(seed), x0.shape), t)
    inputs = dict(img=xt, txt=jnp.asarray(a["t5"][text_idx]), pooled=jnp.asarray(a["pooled"][text_idx]),
                  timesteps=t, img_ids=jnp.asarray(a["img_ids"]), txt_ids=jnp.zeros((a["t5"].shape[1], 3)),
                  guidance=None if guidance is None else jnp.full((len(views),), guidance))
    return init_layerwise(FluxTransformer(parts.transformer_config), {"params": parts.transformer_params}, inputs,
                          jnp.asarray(a["ident_mask"][text_idx]))

"""CLIP text encoder conversion table (transformers `CLIPTextModel`) and loader.

transformers 4.x (and FLUX's `text_encoder/model.safetensors`) stores names under
`text_model.`; transformers 5.x `save_pretrained` writes them without it. The loader
accepts either, choosing by what the checkpoint holds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from purecc_jax import sharding
from purecc_jax.models.clip_text import CLIPTextConfig, init_fn
from purecc_jax.weights.loader import load
from purecc_jax.weights.rules import Leaf, Rule, block_leaf, linear
from purecc_jax.weights.safetensors_io import Checkpoint

PREFIX = "text_model."
# The position-id buffer (arange) that older transformers saved: not a weight.
IGNORED = (r"(^|\.)embeddings\.position_ids$",)


def _layer_norm(ckpt: str, leaf: Leaf) -> list[Rule]:
    return [Rule(f"{ckpt}.weight", (Leaf(leaf.path + ("scale",), leaf.layer),)),
            Rule(f"{ckpt}.bias", (Leaf(leaf.path + ("bias",), leaf.layer),))]


def clip_rules(cfg: CLIPTextConfig, scanned: bool | None = None, prefix: str = PREFIX) -> list[Rule]:
    """Rules between transformers CLIPTextModel names (under `prefix`) and our leaves."""
    scanned = cfg.scan_layers if scanned is None else scanned
    r = [Rule(f"{prefix}embeddings.token_embedding.weight", (Leaf(("token_embedding",)),)),
         Rule(f"{prefix}embeddings.position_embedding.weight", (Leaf(("position_embedding",)),))]
    for i in range(cfg.num_layers):
        b = lambda *p: block_leaf("layers", i, p, scanned)
        t = f"{prefix}encoder.layers.{i}"
        r += _layer_norm(f"{t}.layer_norm1", b("ln1"))
        for ours in ("q", "k", "v"):
            r += linear(f"{t}.self_attn.{ours}_proj", b(ours))
        r += linear(f"{t}.self_attn.out_proj", b("out"))
        r += _layer_norm(f"{t}.layer_norm2", b("ln2"))
        r += linear(f"{t}.mlp.fc1", b("fc1"))
        r += linear(f"{t}.mlp.fc2", b("fc2"))
    r += _layer_norm(f"{prefix}final_layer_norm", Leaf(("final_ln",)))
    if cfg.projection_dim is not None:  # CLIPTextModelWithProjection keeps it outside `text_model.`
        r += linear("text_projection", Leaf(("text_projection",)), bias=False)
    return r


def load_clip(
    path: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
    **runtime,
) -> tuple[CLIPTextConfig, Any]:
    """(config, params) from a transformers CLIPTextModel or CLIPTextModelWithProjection folder.

    `runtime`: CLIPTextConfig runtime fields (dtype, param_dtype, scan_layers, ...).
    With `mesh`, every parameter is placed in its logical sharding; otherwise on device 0.
    Strict: a missing, unexpected or mis-shaped tensor raises WeightsError naming it.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json (expected a transformers CLIPTextModel folder)")
    cfg = CLIPTextConfig.from_hf(json.loads(config_file.read_text()), **runtime)
    ckpt = Checkpoint(path)
    prefix = PREFIX if any(k.startswith(PREFIX) for k in ckpt.keys()) else ""
    boxed = jax.eval_shape(init_fn(cfg, jax.random.key(0), length=1))
    shardings = None if mesh is None else sharding.logical_shardings(boxed, mesh, rules)
    params = load(ckpt, clip_rules(cfg, prefix=prefix), sharding.unbox(boxed), shardings, ignore=IGNORED)
    return cfg, params

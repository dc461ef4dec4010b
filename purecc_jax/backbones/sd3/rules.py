"""SD3 / SD3.5 transformer conversion tables: diffusers `SD3Transformer2DModel` and the
Stability AI single file (`sd3.5_medium.safetensors`, names under `model.diffusion_model.`).

Both tables map to the same parameter leaves (`models/sd3.py`), so either layout imports
and exports through `weights.loader`. The position table (`pos_embed.pos_embed` /
`pos_embed`) is a fixed buffer, not a parameter: `POSITION_TABLE` names it so the loader
can skip it and `backbones.sd3.weights` can check it against the one the model computes.
"""

from __future__ import annotations

import dataclasses

from purecc_jax.models.sd3 import SD3Config
from purecc_jax.weights.rules import Leaf, Rule, fused_linear, linear

SINGLE_FILE_PREFIX = "model.diffusion_model."
POSITION_TABLE = {"diffusers": "pos_embed.pos_embed", "single_file": "pos_embed"}


def block_leaf(cfg: SD3Config, i: int, path: tuple[str, ...], scanned: bool) -> Leaf:
    """Leaf of block `i` among the three stacks `dual_blocks`, `joint_blocks`, `last_block`."""
    if i == cfg.num_layers - 1:
        return Leaf(("last_block", *path))
    stack, j = ("dual_blocks", i) if i < cfg.num_dual else ("joint_blocks", i - cfg.num_dual)
    return Leaf((stack, *path), j) if scanned else Leaf((f"{stack}_{j}", *path))


def _scale(ckpt: str, leaf: Leaf) -> Rule:
    return Rule(ckpt, (Leaf(leaf.path + ("scale",), leaf.layer),))


def _is_dual(cfg: SD3Config, i: int) -> bool:
    return i in cfg.dual_attention_layers


def diffusers_rules(cfg: SD3Config, scanned: bool | None = None) -> list[Rule]:
    """Every parameter tensor of a diffusers SD3Transformer2DModel state dict, mapped to our leaves."""
    scanned = cfg.scan_layers if scanned is None else scanned
    r = [Rule("pos_embed.proj.weight", (Leaf(("patch_embed",)),), "conv2d"),
         Rule("pos_embed.proj.bias", (Leaf(("patch_embed_bias",)),))]
    for ours, theirs in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder")):
        r += linear(f"time_text_embed.{theirs}.linear_1", Leaf((ours, "in_layer")))
        r += linear(f"time_text_embed.{theirs}.linear_2", Leaf((ours, "out_layer")))
    r += linear("context_embedder", Leaf(("txt_in",)))

    for i in range(cfg.num_layers):
        b = lambda *p: block_leaf(cfg, i, p, scanned)
        t = f"transformer_blocks.{i}"
        last = i == cfg.num_layers - 1
        r += linear(f"{t}.norm1.linear", b("x_mod", "lin"))
        r += linear(f"{t}.norm1_context.linear", b("ctx_mod", "lin"))
        attns = [("attn", "x_attn", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k")),
                 ("attn", "ctx_attn", ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))]
        if _is_dual(cfg, i):
            attns.append(("attn2", "x_attn2", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k")))
        for attn, ours, projs, norms in attns:
            for leaf, proj in zip("qkv", projs):
                r += linear(f"{t}.{attn}.{proj}", b(ours, leaf))
            if cfg.qk_norm:
                r += [_scale(f"{t}.{attn}.{norms[0]}.weight", b(ours, "norm_q")),
                      _scale(f"{t}.{attn}.{norms[1]}.weight", b(ours, "norm_k"))]
        r += linear(f"{t}.attn.to_out.0", b("x_attn_out"))
        if _is_dual(cfg, i):
            r += linear(f"{t}.attn2.to_out.0", b("x_attn2_out"))
        r += linear(f"{t}.ff.net.0.proj", b("x_mlp", "fc1"))
        r += linear(f"{t}.ff.net.2", b("x_mlp", "fc2"))
        if not last:
            r += linear(f"{t}.attn.to_add_out", b("ctx_attn_out"))
            r += linear(f"{t}.ff_context.net.0.proj", b("ctx_mlp", "fc1"))
            r += linear(f"{t}.ff_context.net.2", b("ctx_mlp", "fc2"))

    r += linear("norm_out.linear", Leaf(("final_mod", "lin")))
    r += linear("proj_out", Leaf(("final_out",)))
    return r


def single_file_rules(cfg: SD3Config, scanned: bool | None = None, prefix: str = SINGLE_FILE_PREFIX) -> list[Rule]:
    """Stability AI's layout: fused qkv, `x_block` / `context_block`, and the (shift, scale) order of the
    continuous adaptive norms (the last context block's and the output's), which diffusers stores swapped."""
    scanned = cfg.scan_layers if scanned is None else scanned
    d = cfg.hidden_size
    r = [Rule("x_embedder.proj.weight", (Leaf(("patch_embed",)),), "conv2d"),
         Rule("x_embedder.proj.bias", (Leaf(("patch_embed_bias",)),))]
    for ours, theirs in (("time_in", "t_embedder"), ("vector_in", "y_embedder")):
        r += linear(f"{theirs}.mlp.0", Leaf((ours, "in_layer")))
        r += linear(f"{theirs}.mlp.2", Leaf((ours, "out_layer")))
    r += linear("context_embedder", Leaf(("txt_in",)))

    for i in range(cfg.num_layers):
        b = lambda *p: block_leaf(cfg, i, p, scanned)
        t = f"joint_blocks.{i}"
        last = i == cfg.num_layers - 1
        streams = [("x_block", "x"), ("context_block", "ctx")]
        for theirs, ours in streams:
            r += fused_linear(f"{t}.{theirs}.attn.qkv", [b(f"{ours}_attn", q) for q in "qkv"], (d, d, d))
            if cfg.qk_norm:
                r += [_scale(f"{t}.{theirs}.attn.ln_q.weight", b(f"{ours}_attn", "norm_q")),
                      _scale(f"{t}.{theirs}.attn.ln_k.weight", b(f"{ours}_attn", "norm_k"))]
        if _is_dual(cfg, i):
            r += fused_linear(f"{t}.x_block.attn2.qkv", [b("x_attn2", q) for q in "qkv"], (d, d, d))
            if cfg.qk_norm:
                r += [_scale(f"{t}.x_block.attn2.ln_q.weight", b("x_attn2", "norm_q")),
                      _scale(f"{t}.x_block.attn2.ln_k.weight", b("x_attn2", "norm_k"))]
            r += linear(f"{t}.x_block.attn2.proj", b("x_attn2_out"))
        r += linear(f"{t}.x_block.attn.proj", b("x_attn_out"))
        r += linear(f"{t}.x_block.adaLN_modulation.1", b("x_mod", "lin"))
        r += linear(f"{t}.x_block.mlp.fc1", b("x_mlp", "fc1"))
        r += linear(f"{t}.x_block.mlp.fc2", b("x_mlp", "fc2"))
        if last:
            r += _swapped_linear(f"{t}.context_block.adaLN_modulation.1", b("ctx_mod", "lin"))
        else:
            r += linear(f"{t}.context_block.adaLN_modulation.1", b("ctx_mod", "lin"))
            r += linear(f"{t}.context_block.attn.proj", b("ctx_attn_out"))
            r += linear(f"{t}.context_block.mlp.fc1", b("ctx_mlp", "fc1"))
            r += linear(f"{t}.context_block.mlp.fc2", b("ctx_mlp", "fc2"))

    r += _swapped_linear("final_layer.adaLN_modulation.1", Leaf(("final_mod", "lin")))
    r += linear("final_layer.linear", Leaf(("final_out",)))
    return [dataclasses.replace(rule, ckpt=prefix + rule.ckpt) for rule in r]


def _swapped_linear(ckpt: str, leaf: Leaf) -> list[Rule]:
    return [Rule(f"{ckpt}.weight", (Leaf(leaf.path + ("kernel",), leaf.layer),), "linear", swap_halves=True),
            Rule(f"{ckpt}.bias", (Leaf(leaf.path + ("bias",), leaf.layer),), swap_halves=True)]

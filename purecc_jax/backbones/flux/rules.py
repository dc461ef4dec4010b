"""FLUX transformer conversion tables: diffusers `FluxTransformer2DModel` and BFL single file.

One function per checkpoint format returns the full list of rules for a config; the
same list imports (checkpoint -> Flax) and exports (Flax -> checkpoint).
"""

from __future__ import annotations

from purecc_jax.models.flux import FluxConfig
from purecc_jax.weights.rules import Leaf, Rule, block_leaf, fused_linear, linear

BFL_PREFIXES = ("model.diffusion_model.",)


def _norm(ckpt: str, leaf: Leaf) -> Rule:
    return Rule(ckpt, (Leaf(leaf.path + ("scale",), leaf.layer),))


def diffusers_rules(cfg: FluxConfig, scanned: bool | None = None) -> list[Rule]:
    scanned = cfg.scan_layers if scanned is None else scanned
    r: list[Rule] = []
    r += linear("x_embedder", Leaf(("img_in",)))
    r += linear("context_embedder", Leaf(("txt_in",)))
    for ours, theirs in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                         ("guidance_in", "guidance_embedder")):
        if ours == "guidance_in" and not cfg.guidance_embed:
            continue
        r += linear(f"time_text_embed.{theirs}.linear_1", Leaf((ours, "in_layer")))
        r += linear(f"time_text_embed.{theirs}.linear_2", Leaf((ours, "out_layer")))

    for i in range(cfg.depth):
        b = lambda *p: block_leaf("double_blocks", i, p, scanned)
        t = f"transformer_blocks.{i}"
        r += linear(f"{t}.norm1.linear", b("img_mod", "lin"))
        r += linear(f"{t}.norm1_context.linear", b("txt_mod", "lin"))
        for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
            r += linear(f"{t}.attn.{theirs}", b("img_attn", ours), cfg.qkv_bias)
        for ours, theirs in (("q", "add_q_proj"), ("k", "add_k_proj"), ("v", "add_v_proj")):
            r += linear(f"{t}.attn.{theirs}", b("txt_attn", ours), cfg.qkv_bias)
        r += [_norm(f"{t}.attn.norm_q.weight", b("img_attn", "norm_q")),
              _norm(f"{t}.attn.norm_k.weight", b("img_attn", "norm_k")),
              _norm(f"{t}.attn.norm_added_q.weight", b("txt_attn", "norm_q")),
              _norm(f"{t}.attn.norm_added_k.weight", b("txt_attn", "norm_k"))]
        r += linear(f"{t}.attn.to_out.0", b("img_attn_out"))
        r += linear(f"{t}.attn.to_add_out", b("txt_attn_out"))
        r += linear(f"{t}.ff.net.0.proj", b("img_mlp", "fc1"))
        r += linear(f"{t}.ff.net.2", b("img_mlp", "fc2"))
        r += linear(f"{t}.ff_context.net.0.proj", b("txt_mlp", "fc1"))
        r += linear(f"{t}.ff_context.net.2", b("txt_mlp", "fc2"))

    for i in range(cfg.depth_single):
        b = lambda *p: block_leaf("single_blocks", i, p, scanned)
        t = f"single_transformer_blocks.{i}"
        r += linear(f"{t}.norm.linear", b("modulation", "lin"))
        for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
            r += linear(f"{t}.attn.{theirs}", b("attn", ours), cfg.qkv_bias)
        r += [_norm(f"{t}.attn.norm_q.weight", b("attn", "norm_q")),
              _norm(f"{t}.attn.norm_k.weight", b("attn", "norm_k"))]
        r += linear(f"{t}.proj_mlp", b("mlp_in"))
        r += linear(f"{t}.proj_out", b("out"))

    r += linear("norm_out.linear", Leaf(("final_mod", "lin")))
    r += linear("proj_out", Leaf(("final_out",)))
    return r


def bfl_rules(cfg: FluxConfig, scanned: bool | None = None, prefix: str = "") -> list[Rule]:
    """Black Forest Labs' layout (`flux1-dev.safetensors`): fused qkv, fused linear1."""
    scanned = cfg.scan_layers if scanned is None else scanned
    d, m = cfg.hidden_size, cfg.mlp_hidden
    r: list[Rule] = []
    r += linear("img_in", Leaf(("img_in",)))
    r += linear("txt_in", Leaf(("txt_in",)))
    for name in ("time_in", "vector_in") + (("guidance_in",) if cfg.guidance_embed else ()):
        r += linear(f"{name}.in_layer", Leaf((name, "in_layer")))
        r += linear(f"{name}.out_layer", Leaf((name, "out_layer")))

    for i in range(cfg.depth):
        b = lambda *p: block_leaf("double_blocks", i, p, scanned)
        t = f"double_blocks.{i}"
        for s in ("img", "txt"):
            r += linear(f"{t}.{s}_mod.lin", b(f"{s}_mod", "lin"))
            r += fused_linear(f"{t}.{s}_attn.qkv", [b(f"{s}_attn", x) for x in "qkv"], (d, d, d), cfg.qkv_bias)
            r += [_norm(f"{t}.{s}_attn.norm.query_norm.scale", b(f"{s}_attn", "norm_q")),
                  _norm(f"{t}.{s}_attn.norm.key_norm.scale", b(f"{s}_attn", "norm_k"))]
            r += linear(f"{t}.{s}_attn.proj", b(f"{s}_attn_out"))
            r += linear(f"{t}.{s}_mlp.0", b(f"{s}_mlp", "fc1"))
            r += linear(f"{t}.{s}_mlp.2", b(f"{s}_mlp", "fc2"))

    for i in range(cfg.depth_single):
        b = lambda *p: block_leaf("single_blocks", i, p, scanned)
        t = f"single_blocks.{i}"
        r += linear(f"{t}.modulation.lin", b("modulation", "lin"))
        r += fused_linear(f"{t}.linear1", [b("attn", "q"), b("attn", "k"), b("attn", "v"), b("mlp_in")],
                          (d, d, d, m))
        r += [_norm(f"{t}.norm.query_norm.scale", b("attn", "norm_q")),
              _norm(f"{t}.norm.key_norm.scale", b("attn", "norm_k"))]
        r += linear(f"{t}.linear2", b("out"))

    # BFL stores the final modulation as (shift, scale); ours (like diffusers) is (scale, shift).
    r += [Rule("final_layer.adaLN_modulation.1.weight", (Leaf(("final_mod", "lin", "kernel")),), "linear",
               swap_halves=True),
          Rule("final_layer.adaLN_modulation.1.bias", (Leaf(("final_mod", "lin", "bias")),), swap_halves=True)]
    r += linear("final_layer.linear", Leaf(("final_out",)))
    if prefix:
        from dataclasses import replace

        r = [replace(rule, ckpt=prefix + rule.ckpt) for rule in r]
    return r

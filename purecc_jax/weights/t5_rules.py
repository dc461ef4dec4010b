"""T5 encoder conversion table (transformers `T5EncoderModel`) and loader.

The token table is tied: transformers holds it as `shared.weight` and
`encoder.embed_tokens.weight`, and a saved checkpoint may contain either name or both
(`save_pretrained` keeps only `shared.weight`; some exports keep both). The loader reads
`shared.weight` when present, else `encoder.embed_tokens.weight`, and ignores the other.
Decoder and LM-head tensors of a full T5 checkpoint are ignored, as transformers'
T5EncoderModel ignores them; nothing else is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from purecc_jax import sharding
from purecc_jax.models.t5 import T5Config, init_fn
from purecc_jax.weights.loader import load
from purecc_jax.weights.rules import Leaf, Rule, block_leaf, linear
from purecc_jax.weights.safetensors_io import Checkpoint

EMBED_NAMES = ("shared.weight", "encoder.embed_tokens.weight")
IGNORED = (r"^decoder\.", r"^lm_head\.")


def t5_rules(cfg: T5Config, scanned: bool | None = None, embed_name: str = EMBED_NAMES[0]) -> list[Rule]:
    """Rules between transformers T5EncoderModel names and our leaves."""
    scanned = cfg.scan_layers if scanned is None else scanned
    r = [Rule(embed_name, (Leaf(("token_embedding",)),)),
         Rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              (Leaf(("relative_attention_bias",)),))]
    for i in range(cfg.num_layers):
        b = lambda *p: block_leaf("blocks", i, p, scanned)
        t = f"encoder.block.{i}.layer"
        r.append(Rule(f"{t}.0.layer_norm.weight", (b("attn_norm", "scale"),)))
        for ours in ("q", "k", "v", "o"):
            r += linear(f"{t}.0.SelfAttention.{ours}", b(ours), bias=False)
        r.append(Rule(f"{t}.1.layer_norm.weight", (b("ff_norm", "scale"),)))
        for ours in ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo"):
            r += linear(f"{t}.1.DenseReluDense.{ours}", b(ours), bias=False)
    r.append(Rule("encoder.final_layer_norm.weight", (Leaf(("final_norm", "scale")),)))
    return r


def load_t5(
    path: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Any]] = sharding.DEFAULT_RULES,
    **runtime,
) -> tuple[T5Config, Any]:
    """(config, params) from a transformers T5EncoderModel folder (config.json + safetensors,
    single or sharded with an index json).

    `runtime`: T5Config runtime fields (dtype, param_dtype, scan_layers, remat_policy, ...).
    With `mesh`, every parameter is placed in its logical sharding; otherwise on device 0.
    Strict: a missing, unexpected or mis-shaped tensor raises WeightsError naming it.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json (expected a transformers T5EncoderModel folder)")
    cfg = T5Config.from_hf(json.loads(config_file.read_text()), **runtime)
    ckpt = Checkpoint(path)
    embed_name = next((n for n in EMBED_NAMES if n in ckpt), EMBED_NAMES[0])
    ignore = IGNORED + tuple(f"^{re.escape(n)}$" for n in EMBED_NAMES if n != embed_name)
    boxed = jax.eval_shape(init_fn(cfg, jax.random.key(0), length=1))
    shardings = None if mesh is None else sharding.logical_shardings(boxed, mesh, rules)
    params = load(ckpt, t5_rules(cfg, embed_name=embed_name), sharding.unbox(boxed), shardings, ignore=ignore)
    return cfg, params

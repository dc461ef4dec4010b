"""Tiny diffusers SD3 transformers and helpers shared by the SD3 tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from purecc_jax.models.sd3 import SD3Config
from purecc_jax.weights.safetensors_io import save_file


def tiny_config(**overrides) -> dict:
    """diffusers SD3Transformer2DModel kwargs: 3 blocks (MMDiT-X, MMDiT, pre-only), width 32, RMS q/k norm."""
    cfg = dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20,
        pos_embed_max_size=12, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    cfg.update(overrides)
    return cfg


def build_torch(cfg: dict, seed: int = 0):
    """A diffusers SD3Transformer2DModel with random (non-zero) weights everywhere, fp32, eval."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Zero-initialised gates and unit norms would hide a mis-mapped tensor.
            p.copy_(torch.randn_like(p) * (0.05 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name and p.ndim == 1 else 0.0))
    return model


def save_torch(model, folder: Path, config: dict) -> Path:
    """A diffusers `transformer/` folder (config.json + one safetensors file, position buffer included)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors")
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    (folder / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **cfg}))
    return folder


def random_inputs(cfg: SD3Config, batch: int, height: int, width: int, text_len: int, seed: int = 0) -> dict:
    """Inputs of our model: NHWC latents (latent pixels), t in [0, 1]."""
    rng = np.random.default_rng(seed)
    return dict(
        latents=rng.standard_normal((batch, height, width, cfg.in_channels)).astype(np.float32),
        txt=rng.standard_normal((batch, text_len, cfg.context_dim)).astype(np.float32),
        pooled=rng.standard_normal((batch, cfg.pooled_dim)).astype(np.float32),
        timesteps=rng.uniform(0.05, 0.95, (batch,)).astype(np.float32),
    )


def run_torch(model, inputs: dict) -> np.ndarray:
    """diffusers' forward on the same inputs (NCHW in and out, timesteps x 1000 as the pipeline passes), NHWC out."""
    t = lambda x: torch.from_numpy(np.asarray(x))
    with torch.no_grad():
        out = model(
            hidden_states=t(inputs["latents"]).permute(0, 3, 1, 2), encoder_hidden_states=t(inputs["txt"]),
            pooled_projections=t(inputs["pooled"]), timestep=t(inputs["timesteps"]) * 1000.0, return_dict=False,
        )[0]
    return out.permute(0, 2, 3, 1).numpy()

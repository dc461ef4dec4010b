"""Tiny diffusers FLUX transformers and helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from purecc_jax.models.flux import FluxConfig
from purecc_jax.weights.safetensors_io import save_file


def tiny_config(**overrides) -> dict:
    cfg = dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    cfg.update(overrides)
    return cfg


def build_torch(cfg: dict, seed: int = 0):
    """A diffusers FluxTransformer2DModel with random (non-zero) weights everywhere, fp32, eval."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # diffusers initialises some norms to ones and biases to zero; perturb all so
            # that a mis-mapped tensor shows up in the output.
            p.copy_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name and p.ndim == 1 else 0.0))
    return model


def save_torch(model, folder: Path, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    if config is not None:
        import json

        (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **config}))
    return folder


def latent_ids(h: int, w: int) -> np.ndarray:
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def random_inputs(cfg: FluxConfig, batch: int, h: int, w: int, text_len: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return dict(
        img=rng.standard_normal((batch, h * w, cfg.in_channels)).astype(np.float32),
        txt=rng.standard_normal((batch, text_len, cfg.context_dim)).astype(np.float32),
        pooled=rng.standard_normal((batch, cfg.pooled_dim)).astype(np.float32),
        timesteps=rng.uniform(0.05, 0.95, (batch,)).astype(np.float32),
        img_ids=latent_ids(h, w),
        txt_ids=np.zeros((text_len, 3), np.float32),
        guidance=np.full((batch,), 3.5, np.float32) if cfg.guidance_embed else None,
    )


def run_torch(model, inputs: dict) -> np.ndarray:
    t = lambda x: None if x is None else torch.from_numpy(np.asarray(x))
    with torch.no_grad():
        out = model(
            hidden_states=t(inputs["img"]), encoder_hidden_states=t(inputs["txt"]),
            pooled_projections=t(inputs["pooled"]), timestep=t(inputs["timesteps"]),
            img_ids=t(inputs["img_ids"]), txt_ids=t(inputs["txt_ids"]), guidance=t(inputs["guidance"]),
            return_dict=False,
        )[0]
    return out.numpy()

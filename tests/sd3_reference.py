"""Tiny diffusers SD3 transformers and pipelines, and helpers shared by the SD3 tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline_reference import clip_tokenizer, t5_tokenizer
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


CLIP_L, CLIP_G, T5_WIDTH = 16, 24, 48  # CLIP widths sum below T5's: the pipeline zero-pads them


def _clip(tokenizer, width: int, projection: int, eos: int, act: str):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=projection,
        eos_token_id=eos, bos_token_id=0, pad_token_id=1)).eval()


def build_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline of tiny random models (float32, eval): CLIP-L-like (legacy eos 2, quick_gelu),
    CLIP-G-like (real eos id, gelu), T5, a 16-channel VAE with SD3's factors, an MMDiT-X transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok_l, tok_g, tok_t5 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    clip_l = _clip(tok_l, CLIP_L, 12, 2, "quick_gelu")
    clip_g = _clip(tok_g, CLIP_G, 20, len(tok_g) - 1, "gelu")
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok_t5), d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
        dropout_rate=0.0)).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    transformer = build_torch(dict(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm"), seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l,
                                    tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g, text_encoder_3=t5,
                                    tokenizer_3=tok_t5)

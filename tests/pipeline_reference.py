"""A tiny diffusers FLUX pipeline folder built in code (random weights, tiny tokenizers).

Same layout and component classes as the FLUX.1-dev / schnell downloads: CLIPTokenizer and
T5TokenizerFast, CLIPTextModel (legacy eos_token_id 2, pooled at the largest id),
T5EncoderModel whose table is larger than its tokenizer (as T5-XXL's 32128 vs 32100),
AutoencoderKL with 16 latent channels, 8x downsampling and no quant convs, and a
FluxTransformer2DModel with 64 input channels.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch

from flux_reference import build_torch

WORDS = ("a", "photo", "of", "dog", "cat", "the", "red", "on", "blue", "grass", "in", "sitting", "blurry", "ugly")
CHARS = tuple(string.ascii_lowercase + string.digits + ",.!?'")
T5_EXTRA_IDS = 3
T5_TABLE_PADDING = 5  # encoder rows beyond the tokenizer's entries
CLIP_WIDTH, T5_WIDTH = 24, 32

DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                     num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
SCHNELL_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                         num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def clip_tokenizer():
    """Byte-level BPE over letters, digits and a little punctuation, merges for WORDS, specials last."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in CHARS:
            vocab[c + suffix] = len(vocab)
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the largest id, as in CLIP's vocabulary
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer():
    """A SentencePiece-style Unigram model (word pieces with the ▁ prefix, letters) plus sentinel ids."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    for c in CHARS:
        pieces += [(c, -3.0), ("▁" + c, -3.5)]
    return T5TokenizerFast(vocab=pieces, extra_ids=T5_EXTRA_IDS)


def _perturb(model, scale: float = 0.02):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def build_pipeline(guidance_embeds: bool = True, seed: int = 0):
    """A FluxPipeline of tiny random models (float32, eval)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=CLIP_WIDTH, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, eos_token_id=2, bos_token_id=0, pad_token_id=1)).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok) + T5_TABLE_PADDING, d_model=T5_WIDTH, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
        dropout_rate=0.0)).eval()
    vae = _perturb(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159).eval())
    transformer = build_torch(dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6)), seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if guidance_embeds else SCHNELL_SCHEDULER))
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)


def save_pipeline(folder: Path, guidance_embeds: bool = True, seed: int = 0):
    """Builds the tiny pipeline, saves it as a diffusers folder (safetensors), returns it."""
    pipe = build_pipeline(guidance_embeds, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def packed_noise(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """FluxPipeline-style packed latents (B, H/16 * W/16, 64) for H x W images."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, (height // 16) * (width // 16), 64)).astype(np.float32)


def run_diffusers(pipe, prompts, latents: np.ndarray, *, height: int, width: int, steps: int,
                  guidance: float = 3.5, max_sequence_length: int = 16, **kwargs) -> np.ndarray:
    """FluxPipeline's images (B, H, W, 3) in [0, 1] from the given packed latents."""
    with torch.no_grad():
        out = pipe(prompt=list(prompts), height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, latents=torch.from_numpy(latents), output_type="np",
                   max_sequence_length=max_sequence_length, **kwargs)
    return np.asarray(out.images, np.float32)


def save_peft_lora(pipe, target_modules: list[str], directory: Path, r: int = 3, lora_alpha: float = 6) -> Path:
    """A LoRA made by peft on `pipe`'s transformer (any diffusers pipeline: FLUX, SD3) with random
    B, saved by the pipeline's `save_lora_weights` with the PEFT config in the file's metadata
    (alpha != rank: the scale is only there). Returns the file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=r, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=target_modules)
    pipe.transformer.add_adapter(config)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    type(pipe).save_lora_weights(directory, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                 transformer_lora_adapter_metadata=config.to_dict())
    return Path(directory) / "pytorch_lora_weights.safetensors"

"""The PyTorch train step the JAX one is measured against (the authors' style, eager mode).

diffusers `FluxTransformer2DModel` + peft LoRA on the attention projections (the same modules
as `lora.FLUX_ATTENTION`: to_q/k/v/out.0 and add_q/k/v_proj/to_add_out of the double blocks,
to_q/k/v of the single blocks), float32, AdamW (weight decay 1e-4) and global-norm clipping 1.0,
the same timestep sampler (logit-normal) and losses as `purecc_jax.purecc.step`:

  cc      DreamBooth-LoRA: L_CC of the LoRA model on the complete text
  purecc  stage B: the LoRA model on [complete; base] with gradients, the frozen extractor (its own
          LoRA on the same weights) on [target; null] under `torch.no_grad`, λ*, L_PCC = L_CC + L_PureCC

The cache (latents, T5 states, pooled vectors) lives in memory and the batch gathers from it,
as in the JAX step. `benchmarks.versus_torch` times this step against the JAX one.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch

DOUBLE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclasses.dataclass(frozen=True)
class TorchSize:
    num_heads: int = 4
    head_dim: int = 64
    depth: int = 2
    depth_single: int = 4
    batch: int = 2
    img_tokens: int = 256
    txt_tokens: int = 64
    lora_rank: int = 4
    context_dim: int = 4096
    pooled_dim: int = 768
    in_channels: int = 64


def build_model(size: TorchSize, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised FLUX.1-dev-structured diffusers transformer, float32, eval mode."""
    from diffusers import FluxTransformer2DModel

    d = size.head_dim
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=size.in_channels, num_layers=size.depth, num_single_layers=size.depth_single,
        attention_head_dim=d, num_attention_heads=size.num_heads, joint_attention_dim=size.context_dim,
        pooled_projection_dim=size.pooled_dim, guidance_embeds=True, axes_dims_rope=(d // 8, 7 * d // 16, 7 * d // 16),
    ).eval()


def _with_lora(model: torch.nn.Module, rank: int, seed: int) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    double = "|".join(re.escape(t) for t in DOUBLE_TARGETS)
    targets = [rf"transformer_blocks\.\d+\.attn\.({double})", r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)"]
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules="|".join(targets))
    model = inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:  # B = 0 at init; nonzero so that the step computes what a trained one does
            torch.nn.init.normal_(p, std=0.02)
    return model


class TorchStep:
    """One train step of `stage` ("cc" or "purecc") at `size`; call it to run a step, returns the loss."""

    def __init__(self, stage: str, size: TorchSize, seed: int = 0):
        if stage not in ("cc", "purecc"):
            raise ValueError(f"stage {stage!r} is not 'cc' or 'purecc'")
        self.stage, self.size = stage, size
        base = build_model(size, seed)
        # The extractor is a frozen copy with its own (stage-A) LoRA: same compute as sharing the weights.
        self.extractor = _with_lora(copy.deepcopy(base), size.lora_rank, seed + 1) if stage == "purecc" else None
        self.model = _with_lora(base, size.lora_rank, seed + 2)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
        g = torch.Generator().manual_seed(seed)
        n_img, n_txt = size.img_tokens, size.txt_tokens
        self.cache = dict(latents=0.02 * torch.randn(3, n_img, size.in_channels, generator=g),
                          t5=0.02 * torch.randn(4, n_txt, size.context_dim, generator=g),
                          pooled=0.02 * torch.randn(4, size.pooled_dim, generator=g))
        side = int(n_img ** 0.5)
        ids = torch.zeros(n_img, 3)
        ids[:, 1], ids[:, 2] = torch.arange(n_img) // side, torch.arange(n_img) % side
        self.img_ids, self.txt_ids = ids, torch.zeros(n_txt, 3)
        b = size.batch
        self.index = dict(image=torch.arange(b) % 3, complete=torch.zeros(b, dtype=torch.long),
                          base=torch.ones(b, dtype=torch.long), target=torch.full((b,), 2), null=torch.full((b,), 3))
        self.gen = torch.Generator().manual_seed(seed + 3)

    def _velocity(self, model, xt, t, kinds):
        t5 = torch.cat([self.cache["t5"][self.index[k]] for k in kinds])
        pooled = torch.cat([self.cache["pooled"][self.index[k]] for k in kinds])
        n = len(kinds)
        return model(hidden_states=xt.repeat(n, 1, 1), encoder_hidden_states=t5, pooled_projections=pooled,
                     timestep=t.repeat(n), img_ids=self.img_ids, txt_ids=self.txt_ids,
                     guidance=torch.ones(n * xt.shape[0]), return_dict=False)[0]

    def __call__(self) -> float:
        x0 = self.cache["latents"][self.index["image"]]
        b = x0.shape[0]
        x1 = torch.randn(x0.shape, generator=self.gen)
        t = torch.sigmoid(torch.randn(b, generator=self.gen))
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        mse = lambda a, c: ((a - c) ** 2).flatten(1).mean(1).mean()
        if self.stage == "cc":
            loss = mse(self._velocity(self.model, xt, t, ("complete",)), x1 - x0)
        else:
            v = self._velocity(self.model, xt, t, ("complete", "base"))
            v_c, v_b = v[:b], v[b:]
            with torch.no_grad():
                r = self._velocity(self.extractor, xt, t, ("target", "null"))
                r_tar = (r[:b] - r[b:]).flatten(1)
                r_learn = (v_c - v_b).detach().flatten(1)
                lam = (r_learn * r_tar).sum(1) / ((r_tar * r_tar).sum(1) + 1e-8)
            v_pure = v_b + lam[:, None, None] * r_tar.view_as(v_b)
            loss = mse(v_c, x1 - x0) + mse(v_pure, v_c)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.item()

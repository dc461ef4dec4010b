r"""PureCC on Stable Diffusion 3.5 Medium: the paper's own backbone and recipe (docs/method.md §5).

Command (a diffusers `stabilityai/stable-diffusion-3.5-medium` folder is needed: `huggingface-cli
download stabilityai/stable-diffusion-3.5-medium --local-dir ~/sd3.5-medium`, after accepting its
licence; the single `sd3.5_medium.safetensors` beside it is not read):

    python -m purecc_jax.main --config=configs/sd35_concept.py --workdir=runs/dog_sd35 \
        --config.pretrained=~/sd3.5-medium \
        --config.concept.path=dog --config.concept.dreambench_root=../shared/data/dreambench

    python -m purecc_jax.sample --workdir=runs/dog_sd35 --prompt="a photo of sks dog on the beach" \
        --height=512 --width=512 --output=sks.png

The backbone is recognised from the folder's model_index.json (StableDiffusion3Pipeline);
`config.model.backbone=sd3` says it explicitly.

The recipe: both stages LoRA rank 4 (alpha 4) on the joint attention's projections of both
streams (diffusers' to_q, to_k, to_v, to_out.0 and add_q_proj, add_k_proj, add_v_proj,
to_add_out, plus the MMDiT-X second attention's to_q/k/v/out: `lora.targets="attention"`, see
models/sd3.py), lr 1e-4 constant, batch 2, 400 + 400 steps, 512 px, AdamW (wd 1e-4), grad clip
1.0, bf16. Timesteps: logit-normal(0, 1) then SD3's shift 3.0 (t' = 3t / (1 + 2t)), the
distribution diffusers' train_dreambooth_lora_sd3.py draws from the shift-3 scheduler by default
(continuous here, not its 1000-level grid). SD3 has no guidance embedding (`train_guidance=0`);
samples use classifier-free guidance 7.0 with the empty negative prompt, 28 steps.

Concept embedding: `none`. The identifier (`sks`) is a plain word of the CLIP-L, CLIP-G and T5
tokenizers, as in diffusers' DreamBooth-LoRA script; the authors' learned token rows and the
paper's layer-wise embeddings are not implemented for SD3 (`concept_embedding=token|layerwise`
is refused with a config error; StableDiffusion3Pipeline has no textual-inversion loader, so
diffusers could not load learned token rows of its three encoders).

Output: `workdir/export/pytorch_lora_weights.safetensors`, which
`StableDiffusion3Pipeline.load_lora_weights(workdir/export)` reads.

Expected cost (paper, one A100, bf16): stage A 28 GB / 0.13 h, stage B 30 GB / 0.20 h; the
weights are held once for the trainable model and the extractor (both LoRA adapters of them).
"""

from purecc_jax.defaults import concept_config


def get_config():
    c = concept_config()
    c.concept_embedding = "none"
    c.train_guidance = 0.0
    c.model.max_sequence_length = 256  # StableDiffusion3Pipeline's default T5 length
    c.model.backbone = "sd3"  # auto (the default elsewhere): from the folder's model_index.json
    c.timesteps.shift = 3.0
    for stage in (c.stage_a, c.stage_b):
        stage.steps = 400
        stage.batch_size = 2
        stage.learning_rate = 1e-4
        stage.lora.rank = 4
        stage.lora.alpha = 4.0
        stage.lora.targets = "attention"
    c.sample.guidance = 7.0
    c.sample.steps = 28
    return c

"""Default values of every training option, shared by the config files in configs/.

Each config file starts from `concept_config()` and changes what its setting needs; the
meaning of every field is documented here, next to its default.
"""

import copy

import ml_collections
from ml_collections import config_dict


def number_or_name(value):
    """A field of more than one type: a number or a name (--config.timesteps.shift=3.0 or =auto), a number
    or a tuple (--config.sample.height=512 or ="(512, 768)")."""
    return config_dict.FieldReference(value, field_type=object)


def stage(steps: int = 400, lr: float = 1e-4) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        steps=steps,
        batch_size=2,
        learning_rate=lr,
        embedding_learning_rate=5e-3,  # concept embeddings (authors' code: 5e-3)
        schedule="constant",  # constant | cosine | linear
        warmup_steps=0,
        grad_accum=1,
        full_finetune=False,  # True: train all transformer weights instead of a LoRA
        lora=dict(rank=4, alpha=4.0, targets="attention", init_scale=-1.0),  # init_scale < 0: 1/rank
    ))


def concept_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pretrained = ""  # diffusers FLUX.1 folder (model_index.json, transformer/, vae/, text_encoder*/, tokenizer*/)
    c.seed = 0

    c.method = "purecc"  # purecc (stage A then B) | dreambooth (L_CC only, one stage)
    c.concept_embedding = "token"  # none | token | layerwise
    # True: stage B trains a copy of stage A's concept embedding with its LoRA. The extractor θ1 keeps
    # stage A's embedding either way (θ1 is frozen in the paper), so R_tar does not follow the copy.
    c.train_embeddings_in_stage_b = False
    # A FLUX LoRA file (diffusers/PEFT or kohya) to use as stage B's extractor θ1 instead of training
    # stage A; with it the identifier is a plain word (concept_embedding=none).
    c.extractor_lora = ""

    c.concept = ml_collections.ConfigDict(dict(
        path="",  # folder of images, or a DreamBench subject name
        dreambench_root="",
        identifier="sks",
        class_word="",  # read from DreamBench when empty
        template="a photo of {identifier} {class_word}",
        # "H" or "HxW", multiples of 16; several comma-separated ("512,768"): every image is cached at each,
        # and a batch comes from one of them (one compiled program per training size)
        resolution="512",
        crop="center",  # center | random (random: crops_per_image cached crops)
        crops_per_image=4,
        flip=True,
        # Aspect-ratio buckets: each photo resized to the bucket of each resolution's pixel area (sides multiples
        # of bucket_step, from 2:1 to 1:2) whose aspect ratio is closest to its own, so at most a sliver is
        # cropped (512, step 64: 512x512, 576x448, 448x576, 640x384, 384x640); a batch comes from one bucket at a
        # time, drawn per (seed, step) with probability proportional to its views. False: every photo cropped
        # to the resolution.
        buckets=False,
        bucket_step=64,  # multiple of 16 (kohya's default 64)
        # Weight L_CC per pixel by a mask: <image stem>.mask.png beside the image (white: learn, black: ignore)
        # or the image's alpha channel; images with neither count everywhere. The PureCC term and λ* are not
        # masked (docs/method.md §4).
        masked_loss=False,
        # Probability that a training row's complete text is replaced by the empty prompt (the null text), drawn
        # per (seed, step); kohya / ai-toolkit call it caption dropout (ai-toolkit's default is 0.05). Only L_CC's
        # complete text is dropped: the base, target and null texts never are, and a dropped row of stage B adds
        # no L_PureCC term (it has no complete text to compare with the base text). 0: never.
        caption_dropout=0.0,
    ))

    c.model = ml_collections.ConfigDict(dict(
        backbone="auto",  # auto (the pretrained folder's model_index.json) | flux | sd3
        dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, remat_policy="dots_no_batch",
        attention="auto", max_sequence_length=512,
        # explicit | autodiff: how LoRA's backward is written (models/runtime.py LORA_BACKWARDS); explicit is
        # faster on CPU hosts, both compute the same sums with different rounding
        lora_backward="explicit",
        # none | int8 | fp8: frozen FLUX weights held quantized (per-output-channel scales), LoRA in float32
        base_quantization="none",
    ))
    # data=-1: the largest data axis dividing the batch; the other devices shard the weights (fsdp).
    # An explicit data axis must divide every stage's batch (sharding.mesh_sizes).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.axis_rules = []  # [(logical name, mesh axes), ...] overriding sharding.DEFAULT_RULES

    c.stage_a = stage()
    c.stage_b = stage()

    c.objective = ml_collections.ConfigDict(dict(
        eta=1.0, lambda_mode="adaptive", fixed_lambda=1.0, lambda_clip=(), eps=1e-8,
        stop_grad_original=False, extractor_uses_stage_a_lora=True,
        # every this many stage-B steps, log η‖∇L_PureCC‖ / ‖∇L_CC‖ as `grad_share` (one more backward
        # pass on those steps); 0: never
        gradient_share_every=0,
    ))
    # DreamBooth's prior preservation: class images of the class prompt (drawn once by the pretrained model,
    # or found in class_dir) train beside the concept images with L_CC on the class prompt, weighted by
    # `weight` (0: off). The images are generated with the sampling settings below when class_dir holds
    # fewer than `class_images` (default folder: WORKDIR/class_images).
    c.prior = ml_collections.ConfigDict(dict(
        weight=0.0, class_images=100, prompt="a photo of a {class_word}", class_dir="",
        steps=28, guidance=3.5, true_cfg_scale=1.0, seed=0,
    ))
    # shift: t' = s t / (1 + (s - 1) t) on the sampled t (1: none), or "auto": the pretrained pipeline's shift at
    # each training resolution, from its scheduler config: FLUX.1-dev's dynamic shifting s = e^mu with mu linear
    # in the image tokens (base_shift at base_image_seq_len to max_shift at max_image_seq_len, as FluxPipeline
    # samples); a scheduler without dynamic shifting (SD3.5: shift 3.0) gives its static shift.
    c.timesteps = ml_collections.ConfigDict(dict(sampler="logit_normal", logit_mean=0.0, logit_std=1.0,
                                                 shift=number_or_name(1.0)))
    c.train_guidance = 1.0  # FLUX.1-dev's embedded guidance during training; 0 for a model without (FLUX.1-schnell)

    # One optimizer per trainable group (LoRA or weights; embeddings) at the stage's learning rates
    # (purecc.step.make_optimizer). name: adamw | adafactor (optax) | prodigy | schedule_free_adamw (optax.contrib).
    # b1, b2, eps, weight_decay: AdamW's; also Prodigy's (betas, eps, decoupled weight decay) and schedule-free
    # AdamW's (b1 > 0: its interpolation between the gradient point and the average). grad_clip: global-norm
    # clipping before any of them (0: none).
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, grad_clip=1.0,
        # multiply_by_parameter_scale=False: the learning rate is the step size, as sd-scripts' FLUX Adafactor
        # recipe (scale_parameter=False, relative_step=False); momentum, clipping_threshold 0: off;
        # weight_decay_rate is per step, not scaled by the learning rate.
        adafactor=dict(decay_rate=0.8, clipping_threshold=1.0, min_dim_size_to_factor=128,
                       multiply_by_parameter_scale=False, momentum=0.0, weight_decay_rate=0.0, eps=1e-30),
        # Prodigy estimates the step size; the stage's learning_rate multiplies it: set it to 1.0.
        # beta3 < 0: sqrt(b2).
        prodigy=dict(beta3=-1.0, estim_lr0=1e-6, estim_lr_coef=1.0, safeguard_warmup=False),
        # schedule_free_adamw averages instead of decaying: stages need schedule=constant (warmup applies),
        # and samples and exports use the average (purecc.step.eval_params).
        schedule_free=dict(weight_lr_power=2.0),
    ))

    # An exponential moving average of each stage's trainable tree (LoRA or weights, and concept embeddings),
    # updated in the step after every optimizer update and checkpointed with it. decay 0: off. warmup: the
    # decay ramps up as in diffusers' EMAModel, min(decay, (1 + n) / (10 + n)) at update n + 1 (the first
    # update copies the weights); False: `decay` from the initial weights. When on, the samples during training
    # and the weights stage A hands stage B are the average; export.ema picks what the final stage exports.
    # Not with optimizer.name=schedule_free_adamw (which averages already).
    c.ema = ml_collections.ConfigDict(dict(decay=0.0, warmup=True))

    c.log_every = 10
    # Weights & Biases beside TensorBoard: a project name logs every stage's scalars and sample grids to a W&B
    # run ("<workdir name>/<stage>", grouped by workdir; a resumed stage continues its run). Needs
    # `pip install wandb`; entity "": the logged-in user's; WANDB_MODE=offline logs locally (`wandb sync` later).
    c.log = ml_collections.ConfigDict(dict(wandb_project="", wandb_entity=""))
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.progress = True
    c.max_nonfinite_steps = 10  # stop after this many skipped (NaN/Inf loss or gradient) updates in a row
    c.force_resume = False  # True: continue a workdir whose config.json differs from this config

    c.sample = ml_collections.ConfigDict(dict(
        every=100,  # 0: only at the end of each stage
        prompts=("a photo of {identifier} {class_word}", "a {identifier} {class_word} on the beach",
                 "a photo of a {class_word} on the beach"),
        # height, width: one value for every prompt, or a tuple of one per prompt
        steps=28, guidance=3.5, height=number_or_name(512), width=number_or_name(512), seed=0,
        # Also sample the untrained model before the first stage's first step (samples/000000.png), so the
        # grids show before and after. Not redone on resume.
        at_start=True,
    ))
    # ema: with ema.decay > 0, export the final stage's EMA weights (False: its last trained weights).
    c.export = ml_collections.ConfigDict(dict(dtype="bfloat16", ema=True))
    return c


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """A deep copy of `config` with dotted keys set, as `--config.a.b=value` sets them."""
    c = copy.deepcopy(config)
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c

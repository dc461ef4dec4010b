r"""The toy world: PureCC tested end to end on a CPU in minutes (the README's main command).

    python -m purecc_jax.main --config=configs/toy_concept.py --workdir=runs/toy

1. loads the shipped base model (purecc_jax/toyworld/assets/base: a tiny FLUX with the
   same transformer, CLIP and T5 modules as FLUX.1, in pixel space, pretrained on 32x32 images
   of one shape on a plain background), after checking its sha256; with
   `--config.toy.pretrain_base=True` it pretrains one into `workdir/base/` instead;
2. renders 4 references of a concept the base never saw (a red/yellow striped square, all
   on a gray background) into `workdir/concept/` and customizes the base with each method
   (L_CC only = DreamBooth-LoRA and PureCC with adaptive λ*; `toy.ablations` adds fixed λ,
   large η with and without the gradient through v_b, the layer-wise embedding), each from
   every seed in `toy.seeds`, through the same trainer as FLUX.1-dev;
3. samples every run with the same prompts and noise, reads the images with a deterministic
   analyser, tests the differences across seeds, and writes `workdir/report.{md,json,png}`
   and sample grids.

Budget: <= 15 minutes on 2 slow CPU cores (`toy.quick`: <= 5); see the README for measurements.
"""

import ml_collections

from purecc_jax.defaults import concept_config, stage


def toy_stage(steps: int) -> ml_collections.ConfigDict:
    # Calibrated on DreamBooth-LoRA alone (docs/toy_world.md, "Recipe"): the LoRA learning rate with the
    # concept-free world prompts kept >= 0.85 all-correct that learns the concept best.
    s = stage(steps=steps, lr=4e-4)
    s.batch_size = 4
    s.embedding_learning_rate = 2e-3  # 5x the LoRA's, as in the calibration grid
    s.lora.rank = 8
    s.lora.alpha = 8.0
    return s


def get_config() -> ml_collections.ConfigDict:
    c = concept_config()
    c.concept.identifier = "sks"
    c.concept.class_word = "square"
    c.concept.resolution = "32"
    c.concept.flip = True
    c.concept_embedding = "token"
    # qkv_attn_mlp: the PureCC step 89 -> 65 ms at this size, bit-identical results (benchmarks/README.md,
    # "Remat and scan measured with the fair harness"); blocks scanned (unrolled is no faster here).
    # attention "xla" and lora_backward "autodiff": the rounding the committed study ran with (docs/toy_world.md);
    # the faster "xla_recompute" / "explicit" compute the same sums but end its chaotic training elsewhere.
    c.model.update(dict(dtype="float32", param_dtype="float32", scan_layers=True, remat_policy="qkv_attn_mlp",
                        attention="xla", lora_backward="autodiff", max_sequence_length=12,
                        base_quantization="none"))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    c.stage_a = toy_stage(500)
    c.stage_b = toy_stage(500)
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 1
    c.sample.prompts = ()  # the experiment samples every method itself (workdir/samples/)
    # Prior preservation's class set: "a square" drawn by the base model as the evaluation samples
    # (toy.sampling), written by the experiment into WORKDIR/class_images before any run.
    c.prior.prompt = "a {class_word}"
    c.prior.steps, c.prior.true_cfg_scale = 20, 3.0
    c.objective.gradient_share_every = 10  # how strongly the PureCC term acts, in the report
    c.export.dtype = "float32"

    c.toy = ml_collections.ConfigDict(dict(
        seed=0,
        # Held-out combinations (world.split_combinations): 2 keeps two training shapes for every
        # colour-background pair; the shipped base was trained and is evaluated on the split of 1.
        split_min_shapes=1,
        image_size=32,
        patch=4,  # pixels per token side (FLUX packs 2x2 latent pixels; the codec folds patch/2)
        clip_max_length=16,
        max_sequence_length=12,
        transformer=dict(num_heads=2, head_dim=64, axes_dim=(16, 24, 24), depth=2, depth_single=2, theta=1000.0),
        clip=dict(width=64, mlp=128, layers=2, heads=2),
        t5=dict(d_model=64, d_kv=32, d_ff=128, layers=4, heads=4),
        # The first of the shipped base's two runs (--config.toy.pretrain_base=True): the learning
        # rate follows a cosine schedule of schedule_steps and then stays at its final value;
        # training stops at `steps` (9000: 3000 steps at the final rate). AdamW's weight decay 0.1
        # and T5's 4 layers and 4 heads are what made the held-out combinations come right. The
        # second run continues it (init_from, schedule="constant", learning_rate=2e-4, steps=3000);
        # README "The shipped base" and toyworld/shipped.py have both commands.
        base=dict(steps=9000, schedule_steps=6000, checkpoint_every=500, batch_size=32, learning_rate=2e-3,
                  warmup_steps=50, weight_decay=0.1, b2=0.999, drop_prob=0.15, empty_prob=0.1, ema_decay=0.995,
                  timestep_sampler="logit_normal", timestep_shift=3.0,
                  # False (shipped): the transformer ignores CLIP's pooled vector (its embedder's output
                  # layer zero and untrained), so the text conditions only through T5's tokens.
                  use_pooled=False,
                  # Tried, off in the shipped recipe: each text encoder alone sees "" with this
                  # probability (SD3's dropout) ...
                  encoder_drop_prob=0.0,
                  encoder_drop_which="both",  # or only "clip" / "t5" sees ""
                  # ... and False keeps CLIP and T5 at their random initialisation.
                  train_text_encoders=True,
                  # "cosine" (warmup, then cosine to 0.1x over schedule_steps, then flat) or "constant"
                  # (warmup, then learning_rate); a base folder to start from instead of the random
                  # initialisation (fresh optimizer and EMA), to continue a finished base.
                  schedule="cosine", init_from=""),
        sampling=dict(steps=20, cfg_scale=3.0, shift=3.0),
        evaluation=dict(samples=50, chunk=125),
        # "plain": the references captioned "a sks square", as the paper captions DreamBench (the gray
        # background is not named); "named": "a sks square on a gray background"
        captions="plain",
        arms=("lcc", "prior", "purecc"),  # the main command's arms (toyworld/experiment.py names them all)
        seeds=(0, 1, 2),  # training seeds of every arm (same evaluation prompts and noise for all)
        # --config.toy.study=True: every arm of experiment.STUDY_ARMS on study_seeds, study_samples per
        # prompt set, each run also scored at these fractions of its last stage (checkpoints every
        # study_checkpoint_every steps), for the comparison at equal fidelity (docs/toy_world.md)
        study=False,
        study_seeds=(0, 1, 2, 3, 4, 5, 6, 7),
        study_samples=50,
        checkpoints=(0.25, 0.5, 0.75, 1.0),
        study_checkpoint_every=50,
        alpha=0.05,  # family-wise level of the report's tests (Holm's correction)
        pretrain_base=False,  # pretrain a base into workdir/base instead of loading the shipped one
        base_only=False,  # stop after evaluating the base (with pretrain_base: how the shipped base is made)
        quick=False,  # fewer steps, samples and sampling steps (toyworld/experiment.py QUICK)
        ablations=False,  # also stop-grad through v_b, fixed λ, layer-wise embedding, large η ± stop-grad
        fixed_lambdas=(1.0, 3.0, 5.0),
        etas=(20.0, 100.0),
        references=4,
    ))
    return c

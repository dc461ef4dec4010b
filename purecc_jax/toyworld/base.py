"""Base pretraining of the toy FLUX: transformer, CLIP and T5 trained together from scratch.

The result is written as a diffusers-layout pipeline folder (model_index.json, transformer/,
text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, vae/ with the pixel
codec), so concept training loads it through `backbones.flux.folder.load_pipeline` exactly as
it loads FLUX.1-dev. A finished folder is reused: pretraining runs once per workdir.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from purecc_jax import sharding
from purecc_jax.backbones.flux import weights as flux_io
from purecc_jax.models import clip_text, t5
from purecc_jax.models.flux import FluxConfig, FluxTransformer
from purecc_jax.models.flux import init_fn as flux_init
from purecc_jax.pipeline.codec import PixelCodec
from purecc_jax.pipeline.latents import latent_image_ids, pack
from purecc_jax.pipeline.tokenizers import load_tokenizers
from purecc_jax.pipeline import flow
from purecc_jax.purecc import loop
from purecc_jax.purecc.objective import flow_loss
from purecc_jax.purecc.step import init_state, make_optimizer
from purecc_jax.toyworld import tokenizers as toy_tokenizers
from purecc_jax.toyworld import world
from purecc_jax.weights import loader
from purecc_jax.weights.clip_rules import clip_rules, load_clip
from purecc_jax.weights.t5_rules import load_t5, t5_rules

log = logging.getLogger(__name__)
DONE = "model_index.json"


def words() -> list[str]:
    """Every word of the world's prompts; the identifier stays out (it is the concept's to learn)."""
    return [w for w in world.vocabulary() if w != world.IDENTIFIER]


def codec(toy) -> PixelCodec:
    """Pixel codec whose tokens (after FLUX's 2x2 packing) are toy.patch x toy.patch pixels."""
    if toy.patch % 2:
        raise ValueError(f"toy.patch={toy.patch} must be even (FLUX packs 2x2 latent pixels per token)")
    return PixelCodec(factor=toy.patch // 2)


def model_configs(toy, clip_vocab: int, t5_vocab: int) -> tuple[FluxConfig, clip_text.CLIPTextConfig, t5.T5Config]:
    m, c, t = toy.transformer, toy.clip, toy.t5
    flux = FluxConfig(in_channels=4 * codec(toy).latent_channels, num_heads=m.num_heads, head_dim=m.head_dim,
                      depth=m.depth, depth_single=m.depth_single, context_dim=t.d_model, pooled_dim=c.width,
                      axes_dim=tuple(m.axes_dim), theta=m.theta, guidance_embed=False)
    clip = clip_text.CLIPTextConfig(vocab_size=clip_vocab, hidden_size=c.width, intermediate_size=c.mlp,
                                    num_layers=c.layers, num_heads=c.heads, max_positions=toy.clip_max_length,
                                    eos_token_id=clip_vocab - 1)
    enc = t5.T5Config(vocab_size=t5_vocab, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.layers,
                      num_heads=t.heads, relative_buckets=8, relative_max_distance=16, gated=True,
                      activation="gelu_new")
    return flux, clip, enc


def _zero_residual_branches(params: Any) -> Any:
    """adaLN-Zero: modulation and output layers start at zero, so every block starts as identity."""
    def zero(path, x):
        names = [getattr(p, "key", "") for p in path]
        return jnp.zeros_like(x) if ("lin" in names or "final_out" in names) else x
    return jax.tree_util.tree_map_with_path(zero, params)


def _ignore_pooled(transformer: Any) -> Any:
    """Zeroes the output layer of the pooled-text embedder (`vector_in`): the conditioning vector
    is then the timestep's alone, and the text reaches the model only through T5's tokens in the
    joint attention. The folder stays a standard FLUX transformer (diffusers loads it as is)."""
    out = transformer["vector_in"]["out_layer"]
    return {**transformer, "vector_in": {**transformer["vector_in"],
                                         "out_layer": jax.tree_util.tree_map(jnp.zeros_like, out)}}


class BaseData:
    """Random scenes from the training combinations, rendered and tokenized per step."""

    def __init__(self, toy, tokenizers, max_len: int):
        self.toy, self.tokenizers, self.max_len = toy, tokenizers, max_len
        self.train, self.heldout = world.split_combinations(toy.seed, min_shapes=toy.split_min_shapes)
        self.codec = codec(toy)
        self._ids: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def ids(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        new = sorted({p for p in prompts if p not in self._ids})
        if new:
            clip_ids, t5_ids = self.tokenizers.tokenize(new, self.max_len)
            self._ids.update({p: (c, t) for p, c, t in zip(new, clip_ids, t5_ids)})
        return (np.stack([self._ids[p][0] for p in prompts]), np.stack([self._ids[p][1] for p in prompts]))

    def encoder_dropout(self, prompts: list[str], step: int) -> tuple[list[str], list[str]]:
        """(CLIP's prompts, T5's prompts): each encoder independently sees the empty prompt with
        probability `toy.base.encoder_drop_prob` (SD3's independent text-encoder dropout), so that
        neither path can leave what the prompt says to the other; `toy.base.encoder_drop_which`
        ("both", "clip" or "t5") limits it to one encoder. Its own random stream: with
        probability 0 the batches are those of a base trained before this option existed."""
        p, which = self.toy.base.encoder_drop_prob, self.toy.base.encoder_drop_which
        if not 0 <= p <= 1:
            raise ValueError(f"toy.base.encoder_drop_prob={p} must be in [0, 1]")
        if which not in ("both", "clip", "t5"):
            raise ValueError(f"toy.base.encoder_drop_which={which!r} must be 'both', 'clip' or 't5'")
        if p == 0:
            return prompts, prompts
        drop = np.random.default_rng([self.toy.seed, 8, step]).random((2, len(prompts))) < p
        drop[0] &= which != "t5"
        drop[1] &= which != "clip"
        return ([("" if d else t) for d, t in zip(drop[0], prompts)],
                [("" if d else t) for d, t in zip(drop[1], prompts)])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        b = self.toy.base
        rng = np.random.default_rng([self.toy.seed, 7, step])
        scenes = [world.sample_scene(rng, self.train) for _ in range(b.batch_size)]
        prompts = [world.prompt(s, rng, drop_prob=b.drop_prob, empty_prob=b.empty_prob) for s in scenes]
        images = np.stack([world.render(s, self.toy.image_size) for s in scenes]).astype(np.float32) / 127.5 - 1
        clip_prompts, t5_prompts = self.encoder_dropout(prompts, step)
        clip_ids, t5_ids = self.ids(clip_prompts)[0], self.ids(t5_prompts)[1]
        return dict(latents=np.asarray(pack(self.codec.encode(jnp.asarray(images)))), clip_ids=clip_ids,
                    t5_ids=t5_ids)


def make_step(flux_cfg, clip_cfg, t5_cfg, tx, timesteps: flow.TimestepConfig, img_ids: np.ndarray,
              ema_decay: float, train_text_encoders: bool = True, use_pooled: bool = True):
    """A step whose state.opt_state is {"opt": optimizer state, "ema": EMA of the parameters}.

    With `use_pooled` False the transformer's pooled-text embedder (`vector_in`) gets no
    gradient, so a base initialised by `_ignore_pooled` keeps ignoring CLIP's pooled vector, and
    CLIP is not run (its output would be multiplied by that zero layer; its gradient is zero).

    The EMA (decay warmed up as min(decay, (1 + step) / (10 + step))) is what gets saved:
    a tiny model trained for minutes at a high learning rate samples far cleaner from it.
    """
    flux, clip, enc = FluxTransformer(flux_cfg), clip_text.CLIPTextEncoder(clip_cfg), t5.T5Encoder(t5_cfg)

    def loss_fn(trainable, batch, rng):
        x0 = batch["latents"]
        noise_rng, t_rng = jax.random.split(rng)
        x1 = jax.random.normal(noise_rng, x0.shape)
        t = flow.sample_timesteps(t_rng, x0.shape[0], timesteps)
        if use_pooled:
            _, pooled = clip.apply({"params": trainable["clip"]}, batch["clip_ids"])
        else:  # the zeroed embedder would multiply CLIP's output by zero: skip CLIP altogether
            pooled = jnp.zeros((x0.shape[0], clip_cfg.hidden_size), x0.dtype)
        context = enc.apply({"params": trainable["t5"]}, batch["t5_ids"])
        if not train_text_encoders:  # the encoders keep their random initialisation
            pooled, context = jax.lax.stop_gradient((pooled, context))
        v = flux.apply({"params": trainable["transformer"]}, flow.noisy(x0, x1, t), context, pooled, t,
                       img_ids, jnp.zeros((context.shape[1], 3)))
        loss = flow_loss(v, x0, x1)
        return loss, {"loss": loss}

    def step(state, frozen, batch):
        del frozen
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, batch, rng)
        if not use_pooled:
            grads = {**grads, "transformer": {**grads["transformer"], "vector_in": jax.tree_util.tree_map(
                jnp.zeros_like, grads["transformer"]["vector_in"])}}
        updates, opt_state = tx.update(grads, state.opt_state["opt"], state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        d = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state.opt_state["ema"], trainable)
        return state.replace(step=state.step + 1, trainable=trainable, opt_state={"opt": opt_state, "ema": ema}), metrics

    return step


def scheduler_config(toy) -> dict[str, Any]:
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": toy.sampling.shift, "use_dynamic_shifting": False, "base_image_seq_len": 256,
            "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def write_folder(folder: Path, params: dict[str, Any], configs, toy) -> None:
    """The trained toy model as a diffusers-layout pipeline folder."""
    flux_cfg, clip_cfg, t5_cfg = configs
    flux_io.export_diffusers(params["transformer"], flux_cfg, folder / "transformer")
    for sub, cfg, rules, p in (("text_encoder", clip_cfg, clip_rules(clip_cfg), params["clip"]),
                               ("text_encoder_2", t5_cfg, t5_rules(t5_cfg), params["t5"])):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        loader.export(p, rules, folder / sub, "model")
    (folder / "vae").mkdir(exist_ok=True)
    (folder / "vae" / "config.json").write_text(json.dumps(codec(toy).config(), indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(toy), indent=2))
    index = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["purecc_jax", "PixelShuffleCodec"]}
    (folder / DONE).write_text(json.dumps(index, indent=2))  # written last: marks the folder complete


def _load_trainable(folder: Path, fresh: dict[str, Any]) -> dict[str, Any]:
    """The transformer, CLIP and T5 parameters of a toy base folder, checked against `fresh` (the
    tree the recipe's configs initialise): same parameters, shapes and dtypes, or an error naming
    the first that differs."""
    if not (folder / DONE).is_file():
        raise FileNotFoundError(f"toy.base.init_from={str(folder)!r}: not a finished toy base folder "
                                f"(no {DONE})")
    loaded = {"transformer": flux_io.load_transformer(folder / "transformer")[1],
              "clip": load_clip(folder / "text_encoder")[1],
              "t5": load_t5(folder / "text_encoder_2")[1]}
    loaded = sharding.unbox(loaded)
    want = {jax.tree_util.keystr(k): (v.shape, v.dtype) for k, v in jax.tree_util.tree_leaves_with_path(fresh)}
    got = {jax.tree_util.keystr(k): (v.shape, v.dtype) for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise ValueError(f"toy.base.init_from={str(folder)!r}: parameter {key} is {got.get(key)} there but "
                             f"{want.get(key)} in this recipe's model (shape, dtype); the folder was made "
                             "with other toy.transformer / toy.clip / toy.t5 settings")
    return jax.tree_util.tree_map(jnp.asarray, loaded)


def initial_state(toy, configs, tx):
    """The base's training state at step 0: every block an identity (adaLN-Zero), the pooled
    embedder zero where `toy.base.use_pooled` is False (or, with `toy.base.init_from`, the
    parameters of that base folder), and opt_state {"opt": tx's fresh state, "ema": a copy of the
    parameters}."""
    flux_cfg, clip_cfg, t5_cfg = configs
    keys = jax.random.split(jax.random.key(toy.seed), 3)
    trainable = {
        "transformer": _zero_residual_branches(sharding.unbox(jax.jit(flux_init(flux_cfg, keys[0], img_len=4))())),
        "clip": sharding.unbox(jax.jit(clip_text.init_fn(clip_cfg, keys[1]))()),
        "t5": sharding.unbox(jax.jit(t5.init_fn(t5_cfg, keys[2]))()),
    }
    if not toy.base.use_pooled:
        trainable["transformer"] = _ignore_pooled(trainable["transformer"])
    if toy.base.init_from:
        trainable = _load_trainable(Path(toy.base.init_from), trainable)
    state = jax.jit(lambda tr: init_state(tr, tx, toy.seed))(trainable)
    return state.replace(opt_state={"opt": state.opt_state, "ema": jax.tree_util.tree_map(jnp.copy, trainable)})


def pretrain(toy, workdir: Path, progress: bool = True) -> Path:
    """Trains the toy base model (resuming if interrupted) and returns its pipeline folder."""
    b = toy.base  # the schedule first: a bad toy.base.schedule fails before any file is written
    # The schedule has its own length, so a run stopped at b.steps < b.schedule_steps is the same
    # trajectory as a longer one (the shipped base is such a prefix; see configs/toy_concept.py).
    decay_steps = b.schedule_steps or b.steps
    if b.schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, b.learning_rate, b.warmup_steps, decay_steps,
                                                   b.learning_rate * 0.1)
    elif b.schedule == "constant":  # e.g. continuing a base (init_from) at the cosine's final rate
        sched = optax.linear_schedule(0.0, b.learning_rate, max(b.warmup_steps, 1))
    else:
        raise ValueError(f"toy.base.schedule={b.schedule!r}: expected 'cosine' or 'constant'")
    folder = workdir / "base"
    if (folder / DONE).exists():
        log.info("toy base model found in %s", folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    sizes = toy_tokenizers.save(folder, words(), toy.clip_max_length)
    tokenizers = load_tokenizers(folder, *sizes)
    configs = model_configs(toy, *sizes)
    tx = make_optimizer({k: sched for k in ("transformer", "clip", "t5")}, b2=b.b2,
                        weight_decay=b.weight_decay, grad_clip=1.0)
    state = initial_state(toy, configs, tx)
    data = BaseData(toy, tokenizers, toy.max_sequence_length)
    f = codec(toy).downsample_factor
    img_ids = latent_image_ids(toy.image_size // f, toy.image_size // f)
    timesteps = flow.TimestepConfig(sampler=b.timestep_sampler, shift=b.timestep_shift)
    step = jax.jit(make_step(*configs, tx, timesteps, img_ids, b.ema_decay, b.train_text_encoders,
                             b.use_pooled), donate_argnums=(0,))
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    cfg = loop.LoopConfig(steps=b.steps, log_every=25, checkpoint_every=b.checkpoint_every or max(b.steps // 4, 1),
                          keep_checkpoints=1,
                          progress=progress)
    state = loop.run_stage("base", workdir / "base_training", cfg, state, shardings, step, {}, data.batch)
    write_folder(folder, jax.device_get(state.opt_state["ema"]), configs, toy)
    return folder

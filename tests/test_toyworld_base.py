"""The shipped toy base: its checksum is checked, and it draws the held-out world as well as stated."""

import config_files
import math
import shutil

import numpy as np
import pytest

from purecc_jax.backbones.flux.folder import load_pipeline
from purecc_jax.toyworld import evaluate, experiment, shipped

# Two world prompts per held-out combination: enough to catch a broken base or sampler, few
# enough to sample in seconds.
PROMPTS = 22


def _config():
    return config_files.load("toy_concept")


def test_shipped_base_matches_its_checksum():
    assert shipped.base_folder() == shipped.ASSET
    assert shipped.digest(shipped.ASSET) == shipped.SHA256


def test_a_changed_base_is_refused(tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(shipped.ASSET, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="has sha256 .* changed or damaged"):
        shipped.base_folder(copy)
    (copy / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="pretrain_base=True"):
        shipped.base_folder(copy)


def test_shipped_base_reaches_its_stated_accuracy():
    config = _config()
    toy = config.toy
    parts = load_pipeline(shipped.base_folder())
    items = [p for p in evaluate.prompts(PROMPTS) if p.set == "world"]
    sampler = experiment.Sampler(parts, toy, items, config.model.max_sequence_length)
    max_len = config.model.max_sequence_length
    images = sampler(parts.text.encode_prompts([p.text for p in items], max_len),
                     parts.text.encode_prompts([""], max_len))
    scores = evaluate.score(images, items)
    for key, stated in shipped.ACCURACY.items():
        # A sample of 22 images (other noise than the stated measurement's): allow three binomial
        # standard errors below the stated rate, so only a real loss of quality fails.
        slack = 3 * math.sqrt(max(stated * (1 - stated), 0.05 ** 2) / PROMPTS)
        assert scores[key]["rate"] >= stated - slack, (key, scores[key], stated)


def test_encoder_dropout_empties_each_text_encoder_independently(tmp_path):
    from purecc_jax.pipeline.tokenizers import load_tokenizers
    from purecc_jax.toyworld import base
    from purecc_jax.toyworld import tokenizers as toy_tokenizers

    toy = _config().toy
    tokenizers = load_tokenizers(tmp_path, *toy_tokenizers.save(tmp_path, base.words(), toy.clip_max_length))
    empty_clip, empty_t5 = (x[0] for x in tokenizers.tokenize([""], toy.max_sequence_length))

    def empties(p, steps=range(8)):
        toy.base.encoder_drop_prob = p
        data = base.BaseData(toy, tokenizers, toy.max_sequence_length)
        batches = [data.batch(s) for s in steps]
        clip = np.concatenate([(b["clip_ids"] == empty_clip).all(1) for b in batches])
        t5 = np.concatenate([(b["t5_ids"] == empty_t5).all(1) for b in batches])
        return clip, t5, batches

    clip, t5, plain = empties(0.0)
    np.testing.assert_array_equal(clip, t5)  # one prompt for both: only CFG dropout empties them
    cfg_empty = t5
    clip, t5, dropped = empties(0.5)
    n = clip.size  # 8 batches of 32
    assert 0.15 * n < (clip & ~t5).sum() < 0.35 * n and 0.15 * n < (t5 & ~clip).sum() < 0.35 * n
    for a, b in zip(plain, dropped):  # the scenes and the prompts' other draws are those of p = 0
        np.testing.assert_array_equal(a["latents"], b["latents"])
        keep = ~(b["clip_ids"] == empty_clip).all(1)
        np.testing.assert_array_equal(a["clip_ids"][keep], b["clip_ids"][keep])
    toy.base.encoder_drop_which = "clip"  # the same draws, applied to CLIP's prompts only
    clip_only, t5_only, _ = empties(0.5)
    np.testing.assert_array_equal(clip_only, clip)
    np.testing.assert_array_equal(t5_only, cfg_empty)  # T5 is empty only where CFG emptied both
    toy.base.encoder_drop_which = "text"
    with pytest.raises(ValueError, match="encoder_drop_which='text'"):
        base.BaseData(toy, tokenizers, toy.max_sequence_length).batch(0)
    toy.base.encoder_drop_which = "both"
    toy.base.encoder_drop_prob = 1.5
    with pytest.raises(ValueError, match="encoder_drop_prob=1.5"):
        base.BaseData(toy, tokenizers, toy.max_sequence_length).batch(0)


@pytest.mark.parametrize("train_text_encoders,use_pooled", [(True, True), (False, True), (True, False)])
def test_base_step_trains_what_the_recipe_says(tmp_path, train_text_encoders, use_pooled):
    import jax
    import jax.numpy as jnp

    from purecc_jax.models.flux import FluxTransformer
    from purecc_jax.pipeline.latents import latent_image_ids
    from purecc_jax.pipeline.tokenizers import load_tokenizers
    from purecc_jax.pipeline import flow
    from purecc_jax.purecc.step import make_optimizer
    from purecc_jax.toyworld import base
    from purecc_jax.toyworld import tokenizers as toy_tokenizers

    toy = _config().toy
    toy.base.batch_size = 4
    toy.base.use_pooled = use_pooled
    sizes = toy_tokenizers.save(tmp_path, base.words(), toy.clip_max_length)
    configs = base.model_configs(toy, *sizes)
    tx = make_optimizer({k: 1e-3 for k in ("transformer", "clip", "t5")}, weight_decay=0.0)
    state = base.initial_state(toy, configs, tx)
    before = jax.device_get(state.trainable)
    side = toy.image_size // base.codec(toy).downsample_factor
    img_ids = latent_image_ids(side, side)
    step = jax.jit(base.make_step(*configs, tx, flow.TimestepConfig(), img_ids, 0.9, train_text_encoders,
                                  use_pooled))
    batch = base.BaseData(toy, load_tokenizers(tmp_path, *sizes), toy.max_sequence_length).batch(0)
    for _ in range(3):  # from adaLN-Zero, the text encoders get their first gradient at step 3
        state, _ = step(state, {}, batch)
    after = jax.device_get(state.trainable)

    def moved(tree_a, tree_b):
        return max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(tree_a),
                                                              jax.tree_util.tree_leaves(tree_b)))

    assert moved(before["transformer"], after["transformer"]) > 0
    assert (moved(before["t5"], after["t5"]) > 0) == train_text_encoders
    # CLIP reaches the transformer only through the pooled vector: without it, CLIP gets no gradient.
    assert (moved(before["clip"], after["clip"]) > 0) == (train_text_encoders and use_pooled)
    pooled_embedder = after["transformer"]["vector_in"]
    assert (moved(before["transformer"]["vector_in"], pooled_embedder) > 0) == use_pooled
    # Without the pooled vector the trained transformer's velocity does not depend on it at all
    # (after three steps from adaLN-Zero the dependence with it is small, but not zero).
    flux_cfg = configs[0]
    x = jax.random.normal(jax.random.key(1), (1, img_ids.shape[0], flux_cfg.in_channels))
    context = jax.random.normal(jax.random.key(2), (1, toy.max_sequence_length, flux_cfg.context_dim))
    v = [FluxTransformer(flux_cfg).apply({"params": after["transformer"]}, x, context,
                                         jnp.full((1, flux_cfg.pooled_dim), p), jnp.array([0.5]), img_ids,
                                         jnp.zeros((toy.max_sequence_length, 3)))
         for p in (0.0, 3.0)]
    assert (float(jnp.abs(v[0] - v[1]).max()) > 0) == use_pooled


def test_a_base_continues_from_a_finished_folder(tmp_path):
    """toy.base.init_from starts the base's training state (parameters and EMA) from a finished
    base folder, and refuses one made with another model size, naming the parameter."""
    import jax

    from purecc_jax.purecc.step import make_optimizer
    from purecc_jax.toyworld import base
    from purecc_jax.toyworld import tokenizers as toy_tokenizers

    toy = _config().toy
    toy.base.init_from = str(shipped.ASSET)
    sizes = toy_tokenizers.save(tmp_path, base.words(), toy.clip_max_length)
    tx = make_optimizer({k: 1e-3 for k in ("transformer", "clip", "t5")}, weight_decay=0.0)
    state = base.initial_state(toy, base.model_configs(toy, *sizes), tx)
    parts = load_pipeline(shipped.ASSET)
    want = {"transformer": parts.transformer_params, "clip": parts.text.clip_params, "t5": parts.text.t5_params}
    for tree in (state.trainable, state.opt_state["ema"]):
        assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The shipped T5 has 4 layers; a recipe with 2 does not fit it.
    toy.t5.layers = 2
    with pytest.raises(ValueError, match=r"init_from=.*parameter .*t5.* other toy.transformer / toy.clip / toy.t5"):
        base.initial_state(toy, base.model_configs(toy, *sizes), tx)
    toy.t5.layers = 4
    toy.base.init_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere.*not a finished toy base folder"):
        base.initial_state(toy, base.model_configs(toy, *sizes), tx)


def test_an_unknown_base_schedule_is_refused(tmp_path):
    from purecc_jax.toyworld import base

    toy = _config().toy
    toy.base.schedule = "linear"
    with pytest.raises(ValueError, match="toy.base.schedule='linear'"):
        base.pretrain(toy, tmp_path, progress=False)
    assert not (tmp_path / "base").exists()  # refused before anything is written

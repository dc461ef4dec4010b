"""DreamBench metrics with tiny random CLIP / DINO checkpoints (against direct torch
computations) and the evaluation sweep end to end on a tiny trained workdir: images equal to
`python -m purecc_jax.sample`'s, metrics recomputable from the saved images, results files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline_reference
import tiny_runs
from purecc_jax import main as main_lib
from purecc_jax import sample as sample_cli
from purecc_jax import trained as trained_lib
from purecc_jax.data import tfds_dreambench as tdb
from purecc_jax.evaluation import metrics
from purecc_jax.evaluation import sweep

ROOT = Path(__file__).resolve().parents[1]
L = 16  # T5 tokens
SEEDS = 2
TINY = tiny_runs.tiny(**{  # one stage, no concept token: the cheapest run to compile
    "method": "dreambooth", "concept_embedding": "none", "concept.path": "dog", "stage_a.steps": 2,
    "stage_a.learning_rate": 1e-2, "checkpoint_every": 2, "sample.prompts": (),
})


# ----------------------------------------------------------------------------- tiny checkpoints


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """A random CLIPModel (32 px images, 8-d projection) with a tiny tokenizer and CLIP's preprocessing."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = tmp_path_factory.mktemp("clip")
    tok = pipeline_reference.clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8)
    CLIPModel(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dino_path(tmp_path_factory):
    from transformers import ViTConfig, ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    path = tmp_path_factory.mktemp("dino")
    torch.manual_seed(1)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)).eval().save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def random_images(n: int, seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def unit(x: torch.Tensor) -> np.ndarray:
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- metrics


def test_clip_scores_match_torch(clip_path):
    from transformers import CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    clip = metrics.CLIPEmbedder(clip_path, batch_size=2)  # batches of 2: the split must not matter
    images, refs = random_images(3, 0), random_images(2, 1, 64, 32)
    texts = ["a photo of dog", "a red cat on the grass", "blue"]
    model = CLIPModel.from_pretrained(clip_path).eval()
    processor, tokenizer = CLIPImageProcessorPil.from_pretrained(clip_path), CLIPTokenizer.from_pretrained(clip_path)
    with torch.no_grad():
        image_emb = lambda x: unit(model.get_image_features(
            pixel_values=processor(images=list(x), return_tensors="pt")["pixel_values"]).pooler_output)
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        text_emb = unit(model.get_text_features(**tokens).pooler_output)
        want_t = np.mean(np.sum(image_emb(images) * text_emb, axis=-1))
        want_i = np.mean(image_emb(images) @ image_emb(refs).T)
    assert metrics.clip_t(clip, images, texts) == pytest.approx(want_t, abs=1e-6)
    assert metrics.clip_i(clip, images, refs) == pytest.approx(want_i, abs=1e-6)
    assert abs(want_t) > 1e-3 and abs(want_i) < 0.999  # the checks compare something
    assert metrics.clip_i(clip, images, images[::-1]) < 0.999
    assert metrics.clip_i(clip, refs[:1], refs[:1]) == pytest.approx(1.0, abs=1e-6)
    assert metrics.clip_i(clip, images / 255.0, refs) == pytest.approx(want_i, abs=1e-6)  # float [0, 1] input
    np.testing.assert_allclose(np.linalg.norm(clip.texts(texts), axis=-1), 1.0, atol=1e-9)


def test_dino_matches_torch(dino_path):
    from transformers import ViTModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    model = metrics.DINOEmbedder(dino_path)
    images, refs = random_images(2, 2), random_images(3, 3)
    vit, processor = ViTModel.from_pretrained(dino_path).eval(), ViTImageProcessorPil.from_pretrained(dino_path)
    with torch.no_grad():
        cls = lambda x: unit(vit(pixel_values=processor(images=list(x), return_tensors="pt")["pixel_values"])
                             .last_hidden_state[:, 0])
        want = np.mean(cls(images) @ cls(refs).T)
    assert metrics.dino(model, images, refs) == pytest.approx(want, abs=1e-6)
    assert want < 0.999
    assert metrics.dino(model, refs, refs[:1].repeat(3, 0)) < metrics.dino(model, refs[:1], refs[:1]) == \
        pytest.approx(1.0, abs=1e-6)


def test_metric_errors(clip_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        metrics.CLIPEmbedder(tmp_path)
    clip = metrics.CLIPEmbedder(clip_path)
    with pytest.raises(ValueError, match="one text per image"):
        metrics.clip_t(clip, random_images(2, 0), ["a"])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        clip.images(np.zeros((4, 4, 3), np.uint8))


def test_no_torch_or_tensorflow_at_import():
    code = ("import sys; import purecc_jax.evaluation.sweep, purecc_jax.evaluation.metrics, "
            "purecc_jax.data.tfds_dreambench; print(sorted({'torch', 'tensorflow'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("missing", ["torch", "transformers"])
def test_metrics_without_torch_name_the_requirements_file(missing, clip_path, dino_path, monkeypatch, tmp_path):
    """With PyTorch (or transformers) not importable, the embedders and the sweep with --clip / --dino refuse,
    naming requirements-eval.txt (the sweep before it reads a workdir or samples), and that file pins torch."""
    monkeypatch.setitem(sys.modules, missing, None)  # `import torch` raises ImportError meanwhile
    message = rf"{missing} cannot be imported.*pip install -r requirements-eval\.txt"
    for embedder, path in ((metrics.CLIPEmbedder, clip_path), (metrics.DINOEmbedder, dino_path)):
        with pytest.raises(ImportError, match=message):
            embedder(path)
    for flag in (f"--clip={clip_path}", f"--dino={dino_path}"):
        with pytest.raises(ImportError, match=message):
            run_cli(sweep, [f"--workdirs={tmp_path / 'not_a_run'}", f"--output={tmp_path / 'out'}", flag])
    requirements = (ROOT / metrics.REQUIREMENTS).read_text().splitlines()
    assert "-r requirements.txt" in requirements and any(line.startswith("torch==") for line in requirements)
    assert not any(line.startswith("torch") for line in (ROOT / "requirements.txt").read_text().splitlines())


# ----------------------------------------------------------------------------- the sweep


LIVE = ("a {0} {1} in the jungle", "a {0} {1} on the beach", "a red {0} {1}")


def prompt_block(templates) -> str:
    """A prompt list as prompts_and_classes.txt writes it."""
    rows = ",\n".join(f"'{t}'.format(unique_token, class_token)" for t in templates)
    return f"prompt_list = [\n{rows}\n]\n"


@pytest.fixture(scope="module")
def fake_bench(tmp_path_factory):
    """A DreamBench folder with the one subject trained here (2 photos) and 3 live-subject prompts."""
    root = tmp_path_factory.mktemp("bench")
    (root / "prompts_and_classes.txt").write_text(
        f"subject_name,class\ndog,dog\ncan,can\n\nObject Prompts\n\n{prompt_block(('a {0} {1}',))}\n"
        f"Live Subject Prompts\n\n{prompt_block(LIVE)}")
    for subject, seed in (("dog", 5), ("can", 6)):
        (root / subject).mkdir()
        for i, image in enumerate(random_images(2, seed, 48, 48)):
            Image.fromarray(image).save(root / subject / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def workdir(fake_bench, tmp_path_factory):
    """`python -m purecc_jax.main` (in process): DreamBooth-LoRA, 2 steps on 32 px."""
    folder = tmp_path_factory.mktemp("tiny_flux")
    pipeline_reference.save_pipeline(folder, guidance_embeds=True, seed=0)
    workdir = tmp_path_factory.mktemp("runs") / "dog_run"
    argv = ["main", f"--config={ROOT / 'configs' / 'flux_concept.py'}", f"--workdir={workdir}",
            f"--config.pretrained={folder}", f"--config.concept.dreambench_root={fake_bench}", "--nocompilation_cache"]
    argv += [f"--config.{k}={v}" for k, v in TINY.items()]
    main_lib.cli(argv)
    assert (workdir / "export" / "purecc.json").is_file()
    return workdir


def run_cli(module, args: list[str]) -> None:
    module.cli(["prog", *args])


SAMPLING = ["--steps=2", "--height=32", "--width=32", f"--max_sequence_length={L}"]


@pytest.fixture(scope="module")
def swept(workdir, clip_path, dino_path, tmp_path_factory):
    output = tmp_path_factory.mktemp("eval")
    run_cli(sweep, [f"--workdirs={workdir}", f"--output={output}", f"--clip={clip_path}", f"--dino={dino_path}",
                    f"--seeds={SEEDS}", f"--batch_size={SEEDS}", "--reference_resolution=32", *SAMPLING])
    return output


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_sweep_images_are_the_sample_clis(swept, workdir, tmp_path):
    """Prompt 1's customized images = `sample --workdir` of its complete text, base = `sample --pretrained`."""
    pretrained = trained_lib.workdir_pretrained(workdir)
    for args, kind, text in (([f"--workdir={workdir}"], "customized", "a sks dog on the beach"),
                             ([f"--pretrained={pretrained}"], "base", "a dog on the beach")):
        run_cli(sample_cli, [*args, f"--prompt={text}", f"--num_images={SEEDS}", "--seed=0", "--noprogress",
                             f"--output={tmp_path / kind}.npy", *SAMPLING])
        want = np.round(np.load(tmp_path / f"{kind}.npy") * 255).astype(np.int16)
        for s in range(SEEDS):
            got = png(swept / "dog_run" / kind / f"p01_s{s}.png").astype(np.int16)
            assert np.abs(got - want[s]).max() <= 1, (kind, s)
    customized, base = (png(swept / "dog_run" / kind / "p01_s0.png").astype(int) for kind in ("customized", "base"))
    assert np.abs(customized - base).max() > 10
    grid = png(swept / "dog_run" / "grid.png")
    assert grid.shape[0] >= 3 * 32 and grid.shape[1] >= 2 * SEEDS * 32 and grid.std() > 0


def test_sweep_metrics_recompute_from_saved_images(swept, clip_path, dino_path):
    results = json.loads((swept / "results.json").read_text())
    (run,) = results["runs"]
    assert (run["subject"], run["identifier"], run["method"]) == ("dog", "sks", "dreambooth")
    assert [p["complete"] for p in run["prompts"]] == ["a sks dog in the jungle", "a sks dog on the beach",
                                                       "a red sks dog"]
    assert [p["base"] for p in run["prompts"]] == ["a dog in the jungle", "a dog on the beach", "a red dog"]
    m = run["metrics"]
    assert set(m) == set(sweep.METRICS) and results["mean"] == m
    assert m["delta_clip_t"] == pytest.approx(m["clip_t"] - m["clip_t_base"], abs=1e-12)
    assert np.mean([p["clip_i"] for p in run["prompts"]]) == pytest.approx(m["clip_i"], abs=1e-12)

    load = lambda kind: np.stack([png(swept / "dog_run" / kind / f"p{p:02d}_s{s}.png")
                                  for p in range(3) for s in range(SEEDS)])
    customized, base = load("customized"), load("base")
    refs = tdb.subjects(swept / "tfds", ["dog"], resolution=32)["dog"].images
    clip, dino = metrics.CLIPEmbedder(clip_path), metrics.DINOEmbedder(dino_path)
    completes = [p["complete"] for p in run["prompts"] for _ in range(SEEDS)]
    bases = [p["base"] for p in run["prompts"] for _ in range(SEEDS)]
    assert m["clip_i"] == pytest.approx(metrics.clip_i(clip, customized, refs), abs=1e-9)
    assert m["dino"] == pytest.approx(metrics.dino(dino, customized, refs), abs=1e-9)
    assert m["clip_t"] == pytest.approx(metrics.clip_t(clip, customized, completes), abs=1e-9)
    assert m["clip_t_base"] == pytest.approx(metrics.clip_t(clip, base, bases), abs=1e-9)
    assert m["dino_base"] == pytest.approx(metrics.dino(dino, base, refs), abs=1e-9)

    table = (swept / "results.md").read_text()
    assert "| dog_run | dog | dreambooth |" in table and "| **mean** |" in table and "ΔCLIP-T" in table


def test_sweep_without_metrics_only_samples(workdir, swept, tmp_path):
    """No --clip / --dino: images, grid and results without numbers; the TFDS dir of the first sweep is reused."""
    run_cli(sweep, [f"--workdirs={workdir}", f"--output={tmp_path}", f"--data_dir={swept / 'tfds'}",
                    f"--seeds={SEEDS}", f"--batch_size={SEEDS}", "--reference_resolution=32", *SAMPLING])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["runs"][0]["metrics"] == {} and results["mean"] == {}
    assert "No metrics" in (tmp_path / "results.md").read_text()
    np.testing.assert_array_equal(png(tmp_path / "dog_run" / "base" / "p02_s0.png"),
                                  png(swept / "dog_run" / "base" / "p02_s0.png"))
    assert not (tmp_path / "tfds").exists()


def test_sweep_errors(workdir, swept, tmp_path):
    config = json.loads((workdir / "config.json").read_text())
    config["concept"]["path"] = "dog4"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'dog4', not a DreamBench subject"):
        sweep.evaluate([sweep.read_run(tmp_path / "other", "other")], tmp_path / "out",
                       sample_cli.SampleSettings(32, 32, 1, 3.5, L), [0], data_dir=swept / "tfds",
                       reference_resolution=32)
    with pytest.raises(FileNotFoundError, match="training workdir"):
        sweep.read_run(tmp_path / "nothing", "x")

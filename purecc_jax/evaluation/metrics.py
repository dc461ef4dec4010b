"""DreamBench's fidelity and text-alignment metrics: CLIP-I, CLIP-T and DINO (docs/method.md §6).

    CLIP-I  mean cosine of CLIP image embeddings, every generated image x every reference photo
    DINO    the same with DINO ViT CLS embeddings (the last layer's, after its final LayerNorm)
    CLIP-T  mean cosine of each generated image's CLIP image embedding and its prompt's text embedding

The numbers are those of a given checkpoint, so a report must name it. DreamBooth (Ruiz et
al. 2023) and the papers that compare with it use `openai/clip-vit-base-patch32` or
`openai/clip-vit-large-patch14` for CLIP and `facebook/dino-vits16` for DINO (ViT-S/16). No
PyPI package ships these weights and nothing here downloads: download the transformers
folders yourself (`huggingface-cli download facebook/dino-vits16 --local-dir ~/dino-vits16`)
and pass their paths (a bucket folder, gs://..., is copied once to this host: `purecc_jax.paths`).
Each folder's own preprocessing (its preprocessor_config.json: CLIP's
bicubic resize + centre crop to 224 and normalisation; ViT's resize to 224), run by
transformers' PIL image processors (the original implementation; the torchvision ones differ
slightly), and its tokenizer are used, so embeddings are the checkpoint's as published.

PyTorch and transformers are imported inside these functions only: training does not need them.
requirements.txt (the runtime install) has transformers but not PyTorch; `pip install -r
requirements-eval.txt` adds it, and without it the embedders refuse, naming that file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from purecc_jax import paths


REQUIREMENTS = "requirements-eval.txt"


def require_torch() -> None:
    """Raises ImportError naming requirements-eval.txt when PyTorch or transformers cannot be imported."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the DreamBench metrics (CLIP-I, CLIP-T, DINO: --clip, --dino) run transformers' PyTorch "
                          f"models, and {e.name or 'torch'} cannot be imported ({e}). Install them with "
                          f"`pip install -r {REQUIREMENTS}` from the repository root (requirements.txt, the runtime "
                          "install, has no PyTorch); without --clip / --dino the sweep only samples.") from e


def _check_folder(path: str | Path, what: str) -> Path:
    path = paths.local_copy(path) if paths.is_remote(path) else Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} checkpoint {path} is not a transformers folder (no config.json); "
                                "download one (see purecc_jax.evaluation.metrics) and pass its path")
    return path


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 from uint8 or float images in [0, 1] (rounded, as a PNG would store them)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3); got shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def _normalize(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu().float().numpy(), np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _features(output: Any):
    """transformers 5 returns a model output whose pooler_output is the projected embedding."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def _embed_images(embedder, images: np.ndarray, features) -> np.ndarray:
    """(N, D) unit vectors: `features(pixel_values)` over batches of the embedder's preprocessed images."""
    import torch

    images = to_uint8(images)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), embedder.batch_size):
            pixels = embedder.processor(images=list(images[i:i + embedder.batch_size]), return_tensors="pt")
            out.append(_normalize(features(pixels["pixel_values"].to(embedder.device))))
    return np.concatenate(out)


class CLIPEmbedder:
    """Unit-norm CLIP image and text embeddings from a local transformers CLIPModel folder."""

    def __init__(self, path: str | Path, *, device: str = "cpu", batch_size: int = 32):
        require_torch()
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.source = str(path) if paths.is_remote(path) else str(Path(path).expanduser())
        path = _check_folder(path, "CLIP")
        self.path, self.device, self.batch_size = path, device, batch_size
        self.model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval().to(device)
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def images(self, images: np.ndarray) -> np.ndarray:
        """(N, D) float64 unit vectors for (N, H, W, 3) images (uint8, or float in [0, 1])."""
        return _embed_images(self, images, lambda pixels: _features(self.model.get_image_features(pixel_values=pixels)))

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float64 unit vectors; texts longer than CLIP's 77 tokens are truncated."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                        return_tensors="pt").to(self.device)
                features = self.model.get_text_features(input_ids=tokens["input_ids"],
                                                        attention_mask=tokens["attention_mask"])
                out.append(_normalize(_features(features)))
        return np.concatenate(out)


class DINOEmbedder:
    """Unit-norm DINO CLS embeddings from a local transformers ViT folder (facebook/dino-vits16)."""

    def __init__(self, path: str | Path, *, device: str = "cpu", batch_size: int = 32):
        require_torch()
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.source = str(path) if paths.is_remote(path) else str(Path(path).expanduser())
        path = _check_folder(path, "DINO")
        self.path, self.device, self.batch_size = path, device, batch_size
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval().to(device)
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")

    def images(self, images: np.ndarray) -> np.ndarray:
        """(N, D) float64 unit vectors: the CLS token of the last hidden state."""
        return _embed_images(self, images, lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0])


def pairwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) cosines of unit vectors a (N, D) and b (M, D)."""
    return np.asarray(a) @ np.asarray(b).T


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) cosines of matching rows of unit vectors a and b (N, D)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"paired embeddings differ in shape: {a.shape} vs {b.shape}")
    return np.sum(a * b, axis=-1)


def clip_i(clip: CLIPEmbedder, generated: np.ndarray, references: np.ndarray) -> float:
    """CLIP-I: mean CLIP image cosine over all (generated, reference) pairs."""
    return float(pairwise_cosine(clip.images(generated), clip.images(references)).mean())


def dino(model: DINOEmbedder, generated: np.ndarray, references: np.ndarray) -> float:
    """DINO: mean DINO CLS cosine over all (generated, reference) pairs."""
    return float(pairwise_cosine(model.images(generated), model.images(references)).mean())


def clip_t(clip: CLIPEmbedder, images: np.ndarray, texts: Sequence[str]) -> float:
    """CLIP-T: mean cosine of image i and text i (one text per image)."""
    if len(texts) != len(images):
        raise ValueError(f"CLIP-T needs one text per image: {len(images)} images, {len(texts)} texts")
    return float(paired_cosine(clip.images(images), clip.texts(texts)).mean())

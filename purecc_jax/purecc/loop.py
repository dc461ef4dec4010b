"""The training loop of one stage: resume, step, log, checkpoint, sample.

Everything a stage writes lives under its directory:
    checkpoints/<step>/   orbax checkpoints of the TrainState (every N steps, keep K, async)
    metrics.jsonl         every logged metric, one JSON object per logged step
    tensorboard/          the same scalars plus sample grids
    samples/<step>.png    sample grids with their prompts
A stage is finished when its latest checkpoint is at its last step; running it again
restores that checkpoint and returns at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# sample_fn(state) -> (images (N, H, W, 3) float in [0, 1], captions)
SampleFn = Callable[[Any], tuple[np.ndarray, Sequence[str]]]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    sample_every: int = 0  # 0: only at the end
    progress: bool = True


class MetricWriter:
    """metrics.jsonl plus TensorBoard (tensorboardX) scalars and images."""

    def __init__(self, directory: Path):
        from tensorboardX import SummaryWriter

        directory.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(directory / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = SummaryWriter(str(directory / "tensorboard"))

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self._tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()


def read_metrics(directory: Path) -> list[dict[str, float]]:
    path = Path(directory) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # A resumed run may re-log steps after its last checkpoint: keep the latest record per step.
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def grid(images: np.ndarray, captions: Sequence[str], columns: int | None = None, caption_height: int = 14) -> np.ndarray:
    """uint8 grid of images (N, H, W, 3 in [0, 1]) with a caption strip under each."""
    n, h, w, _ = images.shape
    columns = columns or min(n, 4)
    rows = -(-n // columns)
    cell_w = max(w, 96)
    canvas = Image.new("RGB", (columns * cell_w, rows * (h + caption_height)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (img, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, columns)
        x, y = c * cell_w, r * (h + caption_height)
        canvas.paste(Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)), (x, y))
        text = cap if len(cap) * 6 <= cell_w else cap[: max(1, cell_w // 6 - 1)] + "…"
        draw.text((x + 1, y + h + 1), text, fill="black")
    return np.asarray(canvas)


def run_stage(
    name: str,
    directory: Path,
    cfg: LoopConfig,
    state: Any,
    state_shardings: Any,
    step_fn: Callable[[Any, Any, Any], tuple[Any, dict]],
    frozen: Any,
    batch_fn: Callable[[int], Any],
    sample_fn: SampleFn | None = None,
) -> Any:
    """Runs (or resumes) a stage to `cfg.steps`; returns the final TrainState."""
    directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=cfg.async_checkpoints, create=True)
    manager = ocp.CheckpointManager(directory / "checkpoints", options=options)
    start = manager.latest_step() or 0
    if start:
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
        state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        log.info("%s: resumed from step %d in %s", name, start, directory)
    if start >= cfg.steps:
        manager.close()
        return state

    writer = MetricWriter(directory)
    bar = tqdm(total=cfg.steps, initial=start, desc=name, disable=not cfg.progress, dynamic_ncols=True)
    t_last, n_last = time.perf_counter(), start
    try:
        for step in range(start, cfg.steps):
            state, metrics = step_fn(state, frozen, batch_fn(step))
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                values["steps_per_second"] = (done - n_last) / max(now - t_last, 1e-9)
                t_last, n_last = now, done
                writer.scalars(done, values)
                post = {"loss": f"{values['loss']:.4f}"}
                if "lambda_mean" in values:
                    post["λ*"] = f"{values['lambda_mean']:.3f}"
                bar.set_postfix(post)
            bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                manager.save(done, args=ocp.args.StandardSave(state))
            if sample_fn is not None and ((cfg.sample_every and done % cfg.sample_every == 0) or done == cfg.steps):
                images, captions = sample_fn(state)
                picture = grid(images, captions)
                (directory / "samples").mkdir(exist_ok=True)
                Image.fromarray(picture).save(directory / "samples" / f"{done:06d}.png")
                writer.image(done, f"{name}/samples", picture)
    finally:
        bar.close()
        writer.close()
        manager.wait_until_finished()
        manager.close()
    return state

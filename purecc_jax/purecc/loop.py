"""The training loop of one stage: resume, step, log, checkpoint, sample.

Everything a stage writes lives under its directory:
    checkpoints/<step>/   orbax checkpoints of the TrainState (every N steps, keep K, async)
    metrics.jsonl         every logged metric, one JSON object per logged step
    tensorboard/          the same scalars plus sample grids
    samples/<step>.png    sample grids with their prompts (000000.png: the untrained model, `sample_at_start`)
    wandb_run_id, wandb/  with `LoopConfig.wandb`: the id of the stage's Weights & Biases run (the same
                          scalars and grids), so a resumed stage continues it, and wandb's local files
                          (for a stage in a bucket, wandb/ is in the working directory)
A stage is finished when its latest checkpoint is at its last step; running it again
restores that checkpoint and returns at once.

Faults: a run killed at any point resumes from its latest complete checkpoint (orbax writes
a step to a temporary directory and renames it when complete; leftovers are removed) and,
since batches, noise and optimizer state are functions of the checkpointed state and the
step, ends bit-identical to an uninterrupted run. `request_stop` (the SIGTERM handler of
`main`) makes the loop save a checkpoint after the current step and raise `Preempted`.
A step whose update was skipped for a non-finite loss or gradient is counted by the step;
`max_nonfinite_steps` of them in a row raise `NonFiniteError`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from purecc_jax import faults, multihost, paths

log = logging.getLogger(__name__)

# Metrics a step computes only on some steps (nan on the others, which are not logged).
SPARSE_METRICS = ("grad_share",)

# sample_fn(state) -> (images (N, H, W, 3) float in [0, 1], or a list of (H, W, 3) of several sizes, captions)
SampleFn = Callable[[Any], tuple[np.ndarray, Sequence[str]]]


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases beside TensorBoard (config.log.wandb_*): one W&B run per stage, in a group per run.

    W&B keeps the first value of a step logged twice (a resumed stage logs again the steps after its
    last checkpoint); metrics.jsonl keeps the latest. WANDB_MODE=offline writes the runs locally only
    (`wandb sync` uploads them later); online, wandb needs `wandb login` or WANDB_API_KEY."""

    project: str
    entity: str = ""  # "": the logged-in user's default entity
    run: str = ""  # the run's name (its W&B group; W&B runs are named "<run>/<stage>"); "": the stage's name
    config: dict[str, Any] | None = None  # shown as each W&B run's config


def require_wandb(project: str) -> None:
    """Raises ImportError naming the package when W&B logging is asked for and wandb is not installed."""
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        raise ImportError(f"config.log.wandb_project={project!r} logs to Weights & Biases, which needs the wandb "
                          "package: `pip install wandb` (requirements.txt does not install it)") from e


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    sample_every: int = 0  # 0: only at the end
    progress: bool = True
    max_nonfinite_steps: int = 10  # stop after this many skipped (NaN/Inf) updates in a row; 0: never
    wandb: WandbConfig | None = None  # also log the scalars and sample grids to Weights & Biases
    sample_at_start: bool = False  # also sample before the first step (step 0), unless resuming


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM); a checkpoint of the last step was saved."""


class NonFiniteError(FloatingPointError):
    """Too many steps in a row had a NaN/Inf loss or gradient."""


_stop = threading.Event()


def request_stop(*_: Any) -> None:
    """Asks a running stage to checkpoint after its current step and raise `Preempted` (a signal handler)."""
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without torch unless torch is loaded already.

    tensorboardX imports torch, where installed, only to accept torch tensors; the writer here gets
    floats and numpy arrays, and the import would add 1-2 s to the start of every run (torch is
    installed beside diffusers, for export checks and the tests)."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """metrics.jsonl plus TensorBoard (tensorboardX) scalars and images, and W&B's when `wandb` is given
    (the W&B run of stage `stage`)."""

    def __init__(self, directory: Path, wandb: WandbConfig | None = None, stage: str = ""):
        self._wandb = None if wandb is None else _wandb_run(directory, wandb, stage)
        SummaryWriter = _summary_writer_class()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "metrics.jsonl"
        if not paths.is_remote(path) and path.exists():  # a bucket object is written whole or not at all
            # A run killed while writing leaves a partial last line: cut it, or the next record joins it.
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._jsonl = paths.AppendText(path)
        self._tb = SummaryWriter(str(directory / "tensorboard"))

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self._tb.add_image(tag, image, step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(directory: Path, cfg: WandbConfig, stage: str) -> Any:
    """The stage's W&B run: a new one, or the one `directory/wandb_run_id` names (a resumed stage)."""
    require_wandb(cfg.project)
    import wandb

    id_file = paths.path(directory) / "wandb_run_id"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = f"{uuid.uuid4().hex[:12]}-{stage or 'stage'}"
        paths.write_bytes(id_file, run_id.encode())
    name = "/".join(x for x in (cfg.run, stage) if x) or None
    return wandb.init(project=cfg.project, entity=cfg.entity or None, id=run_id, name=name, group=cfg.run or None,
                      job_type=stage or None, config=cfg.config, resume="allow",
                      dir=None if paths.is_remote(directory) else str(directory))


class _NoWriter:
    """The MetricWriter of processes other than process 0: logs and images are written once."""

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(directory: Path) -> list[dict[str, float]]:
    path = paths.path(directory) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # A resumed run may re-log steps after its last checkpoint: keep the latest record per step.
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def grid(images: np.ndarray | Sequence[np.ndarray], captions: Sequence[str], columns: int | None = None,
         caption_height: int = 14) -> np.ndarray:
    """uint8 grid of images (N, H, W, 3 in [0, 1], or N images (H, W, 3) of any sizes, each in a cell of the
    largest) with a caption strip under each."""
    n = len(images)
    h, w = max(img.shape[0] for img in images), max(img.shape[1] for img in images)
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
    directory = paths.path(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=cfg.async_checkpoints, create=True,
        cleanup_tmp_directories=True)
    manager = ocp.CheckpointManager(directory / "checkpoints", options=options)
    start = manager.latest_step() or 0  # complete checkpoints only: a write cut short is never listed
    if start:
        abstract = jax.tree_util.tree_map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
        state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
        log.info("%s: resumed from step %d in %s", name, start, directory)
    if start >= cfg.steps:
        manager.close()
        return state

    writer = MetricWriter(directory, cfg.wandb, name) if multihost.is_main() else _NoWriter()
    bar = tqdm(total=cfg.steps, initial=start, desc=name, disable=not cfg.progress or not multihost.is_main(),
               dynamic_ncols=True)
    t_last, n_last = time.perf_counter(), start
    try:
        if sample_fn is not None and cfg.sample_at_start and start == 0:
            _write_samples(name, directory, writer, 0, sample_fn(state))
        for step in range(start, cfg.steps):
            state, metrics = step_fn(state, frozen, batch_fn(step))
            done = step + 1
            _check_finite(name, cfg, metrics, done, manager.latest_step())
            if done % cfg.log_every == 0 or done == cfg.steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()
                          if not (k in SPARSE_METRICS and np.isnan(v))}
                now = time.perf_counter()
                values["steps_per_second"] = (done - n_last) / max(now - t_last, 1e-9)
                t_last, n_last = now, done
                writer.scalars(done, values)
                post = {"loss": f"{values['loss']:.4f}"}
                if "lambda_mean" in values:
                    post["λ*"] = f"{values['lambda_mean']:.3f}"
                bar.set_postfix(post)
            bar.update(1)
            faults.point(f"{name}:step:{done}")
            saved = done % cfg.checkpoint_every == 0 or done == cfg.steps
            if saved:
                manager.save(done, args=ocp.args.StandardSave(state))
                faults.point(f"{name}:checkpoint:{done}")
            if sample_fn is not None and ((cfg.sample_every and done % cfg.sample_every == 0) or done == cfg.steps):
                # in every process: sampling runs on the whole mesh
                _write_samples(name, directory, writer, done, sample_fn(state))
            if multihost.any_process(stop_requested()) and done < cfg.steps:  # all hosts stop at one step
                if not saved:
                    manager.save(done, args=ocp.args.StandardSave(state))
                manager.wait_until_finished()
                raise Preempted(f"{name}: stopped by a signal after step {done}; checkpoint {done} is saved in "
                                f"{directory / 'checkpoints'}. Run the same command again to resume.")
    finally:
        bar.close()
        writer.close()
        manager.wait_until_finished()
        manager.close()
    return state


def _write_samples(name: str, directory: Path, writer: Any, step: int, samples: tuple[Any, Sequence[str]]) -> None:
    """samples/<step>.png (process 0) and the writer's image of a sample_fn's (images, captions)."""
    images, captions = samples
    picture = grid(images, captions)
    if multihost.is_main():
        png = io.BytesIO()
        Image.fromarray(picture).save(png, format="png")
        paths.write_bytes(directory / "samples" / f"{step:06d}.png", png.getvalue())
    writer.image(step, f"{name}/samples", picture)


def _check_finite(name: str, cfg: LoopConfig, metrics: dict[str, Any], done: int, checkpoint: int | None) -> None:
    """Raises NonFiniteError once `max_nonfinite_steps` updates in a row were skipped.

    Reading the streak waits for the step to finish; a scalar per step is cheap next to a step."""
    if not cfg.max_nonfinite_steps or "nonfinite_streak" not in metrics:
        return
    streak = int(jax.device_get(metrics["nonfinite_streak"]))
    if streak >= cfg.max_nonfinite_steps:
        raise NonFiniteError(
            f"{name}: {streak} steps in a row (up to step {done}) had a NaN or Inf loss or gradient. Their updates "
            f"were skipped, so the parameters and optimizer state are those before them (latest checkpoint: "
            f"step {checkpoint or 'none'}). Check the concept images and captions, lower the learning rate "
            f"(stage_a/stage_b.learning_rate) or use float32 (model.dtype), then run again; "
            f"max_nonfinite_steps={cfg.max_nonfinite_steps} sets this limit.")


def checkpoint_steps(directory: Path) -> list[int]:
    """The complete checkpoint steps of a stage (orbax writes a step folder atomically)."""
    checkpoints = Path(directory) / "checkpoints"
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit())


def restore_trainable(directory: Path, step: int | None = None) -> tuple[dict[str, Any], int]:
    """The `trainable` subtree of a stage's checkpoint (host numpy arrays) and its step (default: the latest).

    Only the trainable part is read: the optimizer state of a full fine-tune would be twice the model again.
    """
    restored, step = restore_leaves(directory, lambda path: path[0] == "trainable", step)
    return restored["trainable"], step


def restore_leaves(directory: Path, keep: Callable[[tuple[str, ...]], bool],
                   step: int | None = None) -> tuple[dict[str, Any], int]:
    """The leaves of a stage's checkpoint whose path (the state's field names and keys, list indices as
    strings, e.g. ("ema", "params", "lora", ...)) `keep` accepts, as host numpy arrays in the checkpoint's
    nesting (dicts, lists), and its step (default: the latest). Nothing else is read."""
    directory = Path(directory)
    steps = checkpoint_steps(directory)
    if not steps:
        raise FileNotFoundError(f"{directory / 'checkpoints'} holds no checkpoint: has this stage run?")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{directory / 'checkpoints'} has no step {step}; it has {steps}")
    path = directory / "checkpoints" / str(step) / "default"
    item = _pruned(ocp.PyTreeCheckpointHandler().metadata(path).tree, keep, ()) or {}
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    if not item:
        return {}, step
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=as_numpy,
                                                                          partial_restore=True))
    return restored, step


def _pruned(tree: Any, keep: Callable[[tuple[str, ...]], bool], path: tuple[str, ...]) -> Any:
    """`tree` (checkpoint metadata) with only the leaves `keep` accepts; None where nothing is left."""
    if isinstance(tree, dict):
        out = {k: _pruned(v, keep, (*path, str(k))) for k, v in tree.items()}
        return {k: v for k, v in out.items() if v is not None} or None
    if isinstance(tree, (list, tuple)):
        out = [_pruned(v, keep, (*path, str(i))) for i, v in enumerate(tree)]
        return None if all(v is None for v in out) else out
    return tree if tree is not None and keep(path) else None

r"""PureCC on FLUX.1-dev: the paper's recipe (docs/method.md §5), both stages, LoRA export.

Command (a FLUX.1-dev diffusers folder is needed: `huggingface-cli download
black-forest-labs/FLUX.1-dev --local-dir ~/FLUX.1-dev`, after accepting its licence):

    python -m purecc_jax.main --config=configs/flux_concept.py --workdir=runs/dog \
        --config.pretrained=~/FLUX.1-dev \
        --config.concept.path=dog --config.concept.dreambench_root=../shared/data/dreambench

A concept may also be any folder of 3-5 photos: `--config.concept.path=~/my_cat
--config.concept.class_word=cat`.

The identifier (`--config.concept.identifier`, default `sks`) becomes a new added token of
both tokenizers with learned CLIP-L and T5 rows (`concept_embedding=token`), the token
diffusers' `load_textual_inversion(..., token="sks")` adds, so the same prompt works in
training, sampling and diffusers; `--config.concept_embedding=none` keeps it a plain word
(pipeline/tokenizers.py says which identifiers are refused and why).

What it does: stage A (400 steps) trains the representation extractor (LoRA rank 4 + a
learned concept token); stage B (400 steps) trains a fresh LoRA of the pretrained model
with L_CC + η·L_PureCC guided by the frozen extractor; then writes
`workdir/export/pytorch_lora_weights.safetensors` (+ the concept token embeddings) for
diffusers' `FluxPipeline.load_lora_weights` / `load_textual_inversion`.

Expected cost (bf16, 512 px, LoRA in both stages so the 11.9 B pretrained weights, 22.2 GiB,
are held once; stage A also runs CLIP-L and T5-XXL, 9.5 GiB, for the concept token): the PureCC
step does about 3x the work of a DreamBooth-LoRA step (docs/method.md §4). Per-chip memory for
Cloud TPU slices, from the TPU compiler, is in benchmarks/README.md (e.g. a v5litepod-8 at one
image per chip with remat `full`: 10.8 GiB in stage A, 6.3 in stage B); `python -m
purecc_jax.compile_check --config=configs/flux_concept.py --topology=v5e-8 ...` checks a run.
"""

from purecc_jax.defaults import concept_config


def get_config():
    return concept_config()

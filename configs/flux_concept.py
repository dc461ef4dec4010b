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

Expected cost (bf16, 512 px, batch 2, one 80 GB accelerator, LoRA both stages so the
12 B pretrained weights are held once): memory ~45 GB in stage B (24 GB weights, T5-XXL
and CLIP on device for the concept token in stage A, activations with remat); the PureCC
step does about 3x the work of a DreamBooth-LoRA step (docs/method.md §4). See
benchmarks/README.md for measured figures.
"""

from purecc_jax.defaults import concept_config


def get_config():
    return concept_config()

"""Drawing from a text-to-image run: `experiments/generate.py --text=...` and notebooks."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np

from m6jax import cli
from m6jax.data import captions as captions_lib
from m6jax.data import tokenizer as tokenizer_lib
from m6jax.decoding.run import load_run
from m6jax.t2i import decode as decode_lib
from m6jax.t2i import vocab as vocab_lib
from m6jax.t2i.data import Prompts
from m6jax.t2i.images import save_grid


@dataclasses.dataclass
class T2IRun:
    config: Any
    model: Any
    mesh: Any
    params: Any
    step_dir: str
    prompts: Prompts
    vocab: vocab_lib.CodeVocab
    image_tokenizer: Any


def load_t2i_run(workdir: str) -> T2IRun:
    """The newest checkpoint of a text-to-image pretraining run and its two tokenizers;
    ValueError (naming what is missing) for a run without a text_to_image task."""
    from m6jax.vq.load import ImageTokenizer
    config, model, mesh, params, _, step_dir = load_run(workdir)
    if not vocab_lib.enabled(config):
        raise ValueError(f"--text: the run in {workdir} has no text_to_image task (its "
                         "data.task_weights); pretrain with experiments/configs/m6_t2i.py")
    image_tokenizer = ImageTokenizer(vocab_lib.vq_from(config))
    d = config.data
    tok = tokenizer_lib.Tokenizer(d.tokenizer_path or os.path.join(workdir, "tokenizer.model"))
    vocab = vocab_lib.CodeVocab(d.vocab_size, image_tokenizer.codebook_size, image_tokenizer.num_codes)
    return T2IRun(config, model, mesh, params, step_dir, Prompts(tok, vocab, d.text_len), vocab,
                  image_tokenizer)


def draw(run: T2IRun, texts: list[str], strategy: str = "sample", *, temperature: float = 1.0,
         top_k: int = 0, top_p: float = 1.0, guidance_scale: float = -1.0, mask_steps: int = 0,
         seed: int = 0):
    """Images for prompts (one row each): (codes [N, n], images f32 [N, S, S, C], seconds
    of the compiled decode call). strategy: greedy / sample (autoregressive, KV cache) or
    mask (MaskGIT, `mask_steps` parallel steps). guidance_scale < 0 / mask_steps 0 take
    the run's config.t2i values. Raises ValueError for a prompt longer than the slots."""
    t = run.config.t2i
    for text in texts:
        if len(run.prompts.tok.encode(text)) > run.prompts.slots:
            raise ValueError(f"--text {text!r} is {len(run.prompts.tok.encode(text))} tokens; this "
                             f"run's prompts hold {run.prompts.slots} (data.text_len - 2 - codes per "
                             "image): shorten it")
    scale = t.guidance_scale if guidance_scale < 0 else guidance_scale
    masked = strategy == "mask"
    rows = np.asarray([run.prompts(x, captions_lib.detect_lang(x), masked) for x in texts], np.int32)
    uncond = np.asarray(run.prompts(None, None, masked), np.int32)
    if masked:
        decode = decode_lib.make_mask_decoder(
            run.model, run.vocab, steps=mask_steps or t.mask_steps, temperature=temperature,
            top_k=top_k, choice_temperature=t.choice_temperature, guidance_scale=scale,
            uncond_prompt=uncond)
    else:
        decode = decode_lib.make_ar_decoder(
            run.model, run.vocab, temperature=0.0 if strategy == "greedy" else temperature,
            top_k=top_k, top_p=top_p, guidance_scale=scale, uncond_prompt=uncond)
    with jax.set_mesh(run.mesh):
        key = jax.random.key(seed)
        compiled = decode.lower(run.params, rows, key).compile()
        t0 = time.perf_counter()
        codes = np.asarray(jax.block_until_ready(compiled(run.params, rows, key)))
        seconds = time.perf_counter() - t0
    return codes, run.image_tokenizer.decode(codes), seconds


def generate_images(workdir: str, text: str, out: str, strategy: str, num_samples: int,
                    **kw) -> np.ndarray:
    """Writes a grid of `num_samples` images for `text` to `out` (PNG); returns codes."""
    try:
        run = load_t2i_run(workdir)
        codes, images, seconds = draw(run, [text] * num_samples, strategy, **kw)
    except ValueError as e:  # InputError included
        cli.refuse(f"input error: {e}")
    save_grid(out, images, cols=math.ceil(math.sqrt(num_samples)), scale=4)
    print(f"step {os.path.basename(run.step_dir)} of {workdir} | {strategy} | {num_samples} "
          f"images for {text!r} ({captions_lib.detect_lang(text)}), "
          f"{seconds / num_samples:.3f} s per image | {out}")
    return codes

r"""The pretraining eval's caption decoding on a trained run: cached vs uncached greedy.

  python benchmarks/eval_captions.py --workdir=runs/quickstart

Decodes the run's held-out digits (the first --num_images) in both languages with the
decoder the evaluator used before (uncached) and the one it uses now (KV cache), with the
evaluator's prompt and 12-token budget; prints wall time per call (the best of
--repeats after a compiling call) and whether the tokens are identical.
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

flags.DEFINE_string("workdir", None, "A pretraining run's --workdir.")
flags.mark_flags_as_required(["workdir"])
flags.DEFINE_integer("num_images", 128, "held-out digits decoded per call (one batch)")
flags.DEFINE_integer("repeats", 3, "timed calls per decoder (the best counts)")
FLAGS = flags.FLAGS


def main(_):
    import jax
    import numpy as np

    from m6jax import generate
    from m6jax.data import Pipeline
    from m6jax.decoding.run import load_run

    workdir = os.path.abspath(FLAGS.workdir)
    config, model, mesh, params, param_sh, step_dir = load_run(workdir)
    pipe = Pipeline(config.data, seed=config.seed, batch_size=1, workdir=workdir)
    patches, image_mask, _ = pipe.caption_eval_set()
    patches, image_mask = patches[:FLAGS.num_images], image_mask[:FLAGS.num_images]
    result = dict(workdir=workdir, step=int(os.path.basename(step_dir)),
                  device=jax.devices()[0].device_kind, num_images=len(patches), max_new=12)
    for lang in ("en", "zh"):
        prompt = np.repeat(np.asarray(pipe.caption_prompt(lang), np.int32)[None], len(patches), 0)
        tokens = {}
        for name, make in (("cached", generate.make_cached_greedy_decoder),
                           ("uncached", generate.make_greedy_decoder)):
            decode = make(model, mesh, param_sh, prompt.shape[1], 12, eos_id=pipe.tokenizer.eos_id)
            with jax.set_mesh(mesh):
                tokens[name] = np.asarray(decode(params, patches, image_mask, prompt))
                best = float("inf")
                for _ in range(FLAGS.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(decode(params, patches, image_mask, prompt))
                    best = min(best, time.perf_counter() - t0)
            result[f"{lang}_{name}_ms"] = 1000 * best
        result[f"{lang}_speedup"] = result[f"{lang}_uncached_ms"] / result[f"{lang}_cached_ms"]
        result[f"{lang}_same_tokens"] = bool(np.array_equal(tokens["cached"], tokens["uncached"]))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)

"""Caption fine-tune from the pretrained checkpoint vs from random init, same steps/data/seed.

Both runs train on the caption task of the training digits and are scored by the
pretraining Evaluator's greedy-decoding class-word accuracy on the held-out digits.
What pretraining already saw: the same caption task on the same training digits (it
was 60% of the tiny mix), so the pretrained start is not a transfer from unrelated
data; its accuracy before fine-tuning is reported too. Held-out digits were never
trained on by either run.
"""
from __future__ import annotations

import os

from m6jax.data.config import TASK_NAMES
from m6jax.finetune import digits, loop, peft
from m6jax.train import evaluation
from m6jax.train.step import make_eval_step


def run(config, ft, pretrained, mesh, workdir: str) -> dict:
    """Two fine-tunes (pretrained start, scratch start) and their caption accuracy."""
    pipe = digits.caption_pipeline(config, workdir)
    model = loop.build_model(config)
    evaluator = None
    out = {}

    def accuracy(params, param_sh, key):
        nonlocal evaluator
        if evaluator is None:  # param shardings are the same for every params here
            eval_step = make_eval_step(model, mesh, param_sh, len(TASK_NAMES))
            evaluator = evaluation.Evaluator(pipe, model, mesh, param_sh, eval_step, TASK_NAMES)
        acc = evaluator.caption_accuracy(params)
        out.update({f"caption_accuracy_{key}": acc["caption_accuracy"],
                    f"caption_accuracy_{key}_en": acc["caption_accuracy_en"],
                    f"caption_accuracy_{key}_zh": acc["caption_accuracy_zh"]})
        out[f"examples_{key}"] = acc["examples"]

    if ft.eval_before:
        params = loop.load_params(config, mesh, pretrained.step_dir)
        accuracy(params, loop.shardings_of(params), "before_finetune")
        del params
    # method=lora adapts the pretrained run; the scratch control has no base to adapt
    # and trains whole, as before.
    adaptation = peft.Adaptation.from_config(ft)
    for key, init in (("pretrained", pretrained.step_dir), ("scratch", None)):
        params, param_sh, stats = loop.finetune(config, mesh, pipe.batch, TASK_NAMES,
                                                os.path.join(workdir, key), init, name=key,
                                                adaptation=adaptation if init else None)
        accuracy(params, param_sh, key)
        out.update({f"{k}_{key}": v for k, v in stats.items()})
        out.update({k: v for k, v in stats.items() if k in ("adapter_bytes", "base_bytes")})
        del params
    return out

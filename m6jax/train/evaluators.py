"""The end-of-run evaluators, by name: each built once from the config, each returning
summary.json entries for the final params. The loop runs every one that applies and
does not know which it calls.

An evaluator is called as `evaluate(stage, state)` (the final `stages.Stage` and its
stored state). Entries under `examples` are lines to print, not summary entries.
"""
from __future__ import annotations

import jax

from m6jax.t2i import evaluate as t2i_evaluate


class Pretraining:
    """Held-out eval losses (`eval_loss`, `eval_loss/<task>`) and the greedy-caption
    accuracy (`caption_*`), with caption `examples` to print."""

    def __init__(self, config, pipe, mesh, workdir):
        del pipe, mesh, workdir
        self.num_examples = config.num_caption_samples

    def __call__(self, stage, state) -> dict:
        params = state.params  # the stored layout: the eval step and the decoder stream it
        losses = stage.evaluator.losses(params)
        captions = stage.evaluator.caption_accuracy(params)
        return {**losses, **{k: v for k, v in captions.items() if k.startswith("caption_")},
                "examples": captions["examples"][: self.num_examples]}


class TextToImage:
    """The t2i_* numbers (`m6jax.t2i.evaluate`) of a run with a text_to_image task;
    grids go to the workdir (process 0) and one line is printed."""

    def __init__(self, config, pipe, mesh, workdir):
        self.config, self.pipe, self.mesh = config, pipe, mesh
        self.workdir = workdir if jax.process_index() == 0 else None

    @staticmethod
    def applies(pipe) -> bool:
        return getattr(pipe, "t2i", None) is not None

    def __call__(self, stage, state) -> dict:
        with jax.set_mesh(self.mesh):
            params = stage.evaluator.decode_params(state.params)  # streamed stacks: as stored
        out = t2i_evaluate.evaluate(self.config, stage.model, self.mesh, params, self.pipe,
                                    self.workdir)
        print("text-to-image: " + " | ".join(f"{k} {v:.3g}" for k, v in out.items()), flush=True)
        return out


REGISTRY = {"pretraining": Pretraining, "text_to_image": TextToImage}


def build(config, pipe, mesh, workdir) -> dict:
    """{name: evaluator} of those in REGISTRY that apply to this run, in registry order."""
    return {name: cls(config, pipe, mesh, workdir) for name, cls in REGISTRY.items()
            if getattr(cls, "applies", lambda pipe: True)(pipe)}


def run_all(evaluators: dict, stage, state) -> dict:
    """{name: its entries}, each evaluator run once on the final state."""
    return {name: evaluate(stage, state) for name, evaluate in evaluators.items()}

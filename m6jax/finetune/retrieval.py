"""Image-text retrieval by caption likelihood on the held-out digits.

Protocol. Queries and candidates are the held-out images (N, ~359 at the default split)
and the distinct captions among them (C = 10 classes x 3 templates x 2 languages = 60).
One score matrix S [N, C] holds log p(caption j + eos | image i, [<caption>, lang_j]),
the sum over the caption's tokens; both directions rank by it:
  image -> text  for each image, rank the C captions (text retrieval)
  text -> image  for each caption, rank the N images (image retrieval)
A hit is any candidate of the query's digit class: captions are templated, so all
images of a class share the very same caption strings, and "the" ground-truth caption
of an image is not distinguishable from another image's. Chance R@1 is therefore ~10%
in both directions, R@5 ~41%. `retrieval_r1` / `retrieval_r5` are the mean of the two
directions; `retrieval_r{1,5}_image_to_text` and `..._text_to_image` give each.
"""
from __future__ import annotations

import numpy as np

from m6jax.data.config import TASK_NAMES
from m6jax.finetune import digits, loop, peft, scoring


def recalls(scores_nc: np.ndarray, relevant_nc: np.ndarray, prefix: str = "retrieval") -> dict:
    """R@1 and R@5 in both directions and their means, from one [N, C] score matrix."""
    out = {}
    for k in (1, 5):
        i2t = scoring.recall_at_k(scores_nc, relevant_nc, k)
        t2i = scoring.recall_at_k(scores_nc.T, relevant_nc.T, k)
        out.update({f"{prefix}_r{k}": (i2t + t2i) / 2, f"{prefix}_r{k}_image_to_text": i2t,
                    f"{prefix}_r{k}_text_to_image": t2i})
    return out


def run(config, ft, pretrained, mesh, workdir: str) -> dict:
    """Fine-tunes captioning on the training digits, then scores retrieval; returns the summary."""
    pipe = digits.caption_pipeline(config, workdir)
    patches, image_labels, captions, caption_labels = digits.heldout_pairs(pipe, ft.eval_images)
    rows = digits.pair_rows(patches, digits.caption_text_rows(pipe, captions))
    relevant = image_labels[:, None] == caption_labels[None, :]                     # [N, C]
    model = loop.build_model(config)

    def score_matrix(params, param_sh):
        scorer = scoring.make_scorer(model, mesh, param_sh)
        return scoring.score_rows(scorer, params, mesh, rows, ft.score_batch).reshape(relevant.shape)

    out = {}
    if ft.eval_before:  # the pretrained checkpoint as it is: pretraining had this task
        params = loop.load_params(config, mesh, pretrained.step_dir)
        out.update(recalls(score_matrix(params, loop.shardings_of(params)), relevant,
                           "before_finetune_retrieval"))
        del params
    params, param_sh, stats = loop.finetune(config, mesh, pipe.batch, TASK_NAMES, workdir,
                                            pretrained.step_dir, name="retrieval",
                                            adaptation=peft.Adaptation.from_config(ft))
    out = {**recalls(score_matrix(params, param_sh), relevant), **out}
    return dict(out, num_images=len(image_labels), num_captions=len(captions), **stats)

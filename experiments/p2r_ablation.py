r"""M6-10T's Pseudo-to-Real claim at a size this machine affords: a Real model trained from
scratch vs Pseudo-to-Real with two or three switch points, same total steps and data.

  python experiments/p2r_ablation.py --workdir=runs/p2r
  python experiments/p2r_ablation.py --workdir=/tmp/p --steps=40 --switch_steps=10,20

Each run is `experiments/configs/p2r_ablation.py:<scratch | p2r_S>` trained into
DIR/<run>/. Losses are the training loss (text cross-entropy) averaged over a trailing
window of --window steps: every run sees the same batches at the same step, so the
curves compare like with like. Writes DIR/p2r_ablation.csv (run, switch_step,
final_loss, steps_to_scratch_loss, wall_s_to_scratch_loss, eval_loss, train_s),
DIR/p2r_ablation.png (loss vs training wall time and vs step) and DIR/p2r_ablation.md
(the table beside the paper's claims). Wall time is time in training steps: compiles
and the delinking included, evaluation excluded.
"""
import csv
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments", "configs"))

from absl import app, flags, logging  # noqa: E402

import p2r_ablation as ablation_config  # noqa: E402

flags.DEFINE_string("workdir", None, "output directory")
flags.DEFINE_integer("steps", ablation_config.TOTAL_STEPS, "training steps of every run")
flags.DEFINE_list("switch_steps", [str(s) for s in ablation_config.SWITCH_STEPS],
                  "Pseudo-to-Real switch steps, one run each")
flags.DEFINE_integer("window", 50, "steps of the trailing mean of the training loss")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS

PAPER = ("M6-10T (Lin et al. 2021): Pseudo-to-Real converges about 7x faster at 10T "
         "parameters; it reaches the pretraining loss of the model trained without it in "
         "6% of the time.")
COLUMNS = ["run", "switch_step", "final_loss", "steps_to_scratch_loss",
           "wall_s_to_scratch_loss", "eval_loss", "train_s"]


def smoothed(rows, window):
    """[(step, train_s, trailing mean loss)] over logged rows within `window` steps."""
    out = []
    for i, r in enumerate(rows):
        recent = [x["loss"] for x in rows[: i + 1] if x["step"] > r["step"] - window]
        out.append((r["step"], r["train_s"], sum(recent) / len(recent)))
    return out


def first_reaching(curve, target):
    """(step, train_s) of the first point at or below `target`, or (nan, nan)."""
    return next(((s, t) for s, t, loss in curve if loss <= target), (math.nan, math.nan))


def main(argv):
    del argv
    from m6jax.train.loop import train
    os.makedirs(FLAGS.workdir, exist_ok=True)
    runs = ["scratch"] + [f"p2r_{int(s)}" for s in FLAGS.switch_steps]
    tokenizer = os.path.join(FLAGS.workdir, "tokenizer.model")  # trained once, shared
    curves, summaries = {}, {}
    for run in runs:
        c = ablation_config.get_config(run)
        c.total_steps = FLAGS.steps
        c.eval_every = 10 * FLAGS.steps
        c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, FLAGS.steps // 4)
        c.data.tokenizer_path = tokenizer
        logging.info("p2r ablation: %s", run)
        run_dir = os.path.join(FLAGS.workdir, run)
        summaries[run] = train(c, run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            curves[run] = smoothed([json.loads(line) for line in f], FLAGS.window)

    target = curves["scratch"][-1][2]
    rows = []
    for run in runs:
        step, wall = first_reaching(curves[run], target)
        rows.append(dict(run=run, switch_step=summaries[run]["pseudo_to_real_switch_step"] or 0,
                         final_loss=round(curves[run][-1][2], 4), steps_to_scratch_loss=step,
                         wall_s_to_scratch_loss=round(wall, 1),
                         eval_loss=round(summaries[run]["eval_loss"], 4),
                         train_s=round(summaries[run]["train_s"], 1)))
    _write(rows, curves, target)


def _write(rows, curves, target):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(FLAGS.workdir, "p2r_ablation.csv"), "w", newline="",
              encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for run, curve in curves.items():
        steps, secs, loss = zip(*curve)
        axes[0].plot(secs, loss, label=run)
        axes[1].plot(steps, loss, label=run)
    for ax, xlabel in zip(axes, ("training wall time (s)", "step")):
        ax.axhline(target, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"training loss ({FLAGS.window}-step trailing mean)")
        ax.legend(fontsize=8)
    fig.suptitle("Pseudo-to-Real vs from scratch (dotted: scratch's final loss)", fontsize=10)
    fig.text(0.01, 0.01, "Paper: " + PAPER, fontsize=7, wrap=True)
    fig.subplots_adjust(bottom=0.2)
    fig.savefig(os.path.join(FLAGS.workdir, "p2r_ablation.png"), dpi=120)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    with open(os.path.join(FLAGS.workdir, "p2r_ablation.md"), "w", encoding="utf-8") as f:
        f.write(f"Paper: {PAPER}\n\nOurs ({FLAGS.steps} steps, 8-layer width-96 M6, this "
                "machine):\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print("Paper:", PAPER)


if __name__ == "__main__":
    app.run(main)

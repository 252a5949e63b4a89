r"""M6-T's routing comparison at a size this machine affords: top-1, top-2, 2 top-1,
4 top-1 (expert prototyping) and hash routing at equal expert count (8), each with and
without the load-balancing loss.

  python experiments/routing_ablation.py --workdir=runs/routing
  python experiments/routing_ablation.py --workdir=/tmp/r --steps=40 --routings=top1,2top1

Each run is `experiments/configs/m6_moe.py:ablation_<routing>[_noaux]` trained for
--steps steps into DIR/<name>/. Writes DIR/routing_ablation.csv (router, k, num_experts,
aux_weight, final_loss = held-out eval loss at the end, step_ms, dropped_fraction,
expert_load_max_over_mean, final_train_loss), DIR/routing_ablation.png (training loss vs
step) and DIR/routing_ablation.md (the table beside the paper's finding).
"""
import csv
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments", "configs"))

from absl import app, flags, logging  # noqa: E402

flags.DEFINE_string("workdir", None, "output directory")
flags.DEFINE_integer("steps", 200, "training steps per run")
flags.DEFINE_list("routings", ["top1", "top2", "2top1", "4top1", "hash"], "routings to run")
flags.DEFINE_list("aux_weights", ["0.01", "0"], "load-balancing loss weights")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS

PAPER = ("M6-T (Yang et al. 2021): \"load imbalance is not a significant problem for model "
         "quality\"; larger k (activated experts) and capacity help, with diminishing returns "
         "and lower speed; k top-1 (expert prototyping) matches or beats top-k at the same "
         "compute, more so in larger models.")
COLUMNS = ["router", "k", "num_experts", "aux_weight", "final_loss", "step_ms",
           "dropped_fraction", "expert_load_max_over_mean", "final_train_loss"]


def main(argv):
    del argv
    import m6_moe

    from m6jax.train.loop import train
    os.makedirs(FLAGS.workdir, exist_ok=True)
    rows, curves = [], {}
    for routing in FLAGS.routings:
        for aux in map(float, FLAGS.aux_weights):
            name = f"{routing}_aux{aux:g}"
            c = m6_moe.get_config(f"ablation_{routing}" + ("" if aux else "_noaux"))
            c.model.moe.aux_loss_weight = aux
            c.total_steps = FLAGS.steps
            c.log_every = max(1, FLAGS.steps // 20)
            c.eval_every = 10 * FLAGS.steps  # only the final eval
            c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, FLAGS.steps // 4)
            c.num_caption_samples = 0
            run_dir = os.path.join(FLAGS.workdir, name)
            logging.info("routing ablation: %s", name)
            s = train(c, run_dir)
            with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
                logged = [json.loads(line) for line in f]
            curves[name] = ([r["step"] for r in logged], [r["loss"] for r in logged])
            rows.append(dict(router=c.model.moe.router, k=c.model.moe.k,
                             num_experts=c.model.moe.num_experts, aux_weight=aux,
                             final_loss=round(s["eval_loss"], 4), step_ms=round(s["step_ms"], 1),
                             dropped_fraction=round(s["dropped_fraction"], 4),
                             expert_load_max_over_mean=round(s["expert_load_max_over_mean"], 3),
                             final_train_loss=round(s["final_train_loss"], 4)))
    _write(rows, curves)


def _write(rows, curves):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(FLAGS.workdir, "routing_ablation.csv"), "w", newline="",
              encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (steps, loss) in curves.items():
        ax.plot(steps, loss, ("-" if "aux0." in name else "--"), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (text cross-entropy)")
    ax.set_title("Routing ablation, 8 experts (dashed: no balancing loss)", fontsize=10)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, "Paper: " + PAPER, fontsize=6, wrap=True)
    fig.subplots_adjust(bottom=0.2)
    fig.savefig(os.path.join(FLAGS.workdir, "routing_ablation.png"), dpi=120)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    with open(os.path.join(FLAGS.workdir, "routing_ablation.md"), "w", encoding="utf-8") as f:
        f.write(f"Paper: {PAPER}\n\nOurs ({FLAGS.steps} steps, tiny M6-MoE, this machine):\n\n")
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("Paper:", PAPER)


if __name__ == "__main__":
    app.run(main)

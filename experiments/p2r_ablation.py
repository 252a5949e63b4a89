r"""M6-10T's Pseudo-to-Real claim at a size this machine affords: a Real model trained from
scratch vs Pseudo-to-Real at two or three switch points x three optimizer handoffs, a
second seed of scratch and of the best setting, and one MoE pair.

  python experiments/p2r_ablation.py --workdir=runs/p2r
  python experiments/p2r_ablation.py --workdir=/tmp/p --steps=60 --switch_steps=20 \
      --handoffs=scaled --seeds=0 --nomoe            # a quick subset

Each run is `experiments/configs/p2r_ablation.py:<variant>` trained into DIR/<run>/ (a run
whose DIR/<run>/summary.json exists is not trained again, so an interrupted ablation
continues where it stopped). The runs, in order:
  scratch; p2r_<S>_<handoff> for every --switch_steps x --handoffs (seed 0);
  then the best of those (fewest steps to scratch's final loss, then lowest final loss;
  or --best) repeated with each further seed beside scratch (`scratch_seed1`, ...);
  then the MoE pair (`moe_scratch`, `moe_<best>`), seed 0.
Losses are the training loss (text cross-entropy), per task averaged over a trailing
window of --window steps and weighted by the data's task weights (`smoothed`): every run
of one seed sees the same batches at the same step, so the curves compare like with
like. Each run is compared with the scratch run of its own seed and model (dense or
MoE): `steps_to_scratch_loss` is the first step whose loss is at or below that scratch
run's final loss, `fraction_of_scratch_steps` that step over scratch's total steps, and
`scratch_steps_to_final_loss` the other way round: the first step at which scratch was
as low as this run's final loss (how far behind or ahead a run ends, in scratch's steps).

`wall_s_to_scratch_loss` is modelled from step times *measured on this CPU*: the median
logged step time of each stage of the run (Pseudo, Real; compiles, the delinking and
evaluation excluded) times the number of steps it took in that stage to reach the loss.
On a CPU a Pseudo step costs what a Real step costs (same FLOPs); the paper's regime,
where the Real giant streams offloaded weights and the Pseudo giant is resident on the
accelerator, is not measured here.

Writes DIR/p2r_ablation.csv (COLUMNS), DIR/p2r_ablation.png (every run's curve) and
DIR/p2r_ablation.md (the table beside the paper's claim).
"""
import csv
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments", "configs"))

from absl import app, flags, logging  # noqa: E402

import p2r_ablation as ablation_config  # noqa: E402

flags.DEFINE_string("workdir", None, "output directory")
flags.DEFINE_integer("steps", ablation_config.TOTAL_STEPS, "training steps of every run")
flags.DEFINE_list("switch_steps", [str(s) for s in ablation_config.SWITCH_STEPS],
                  "Pseudo-to-Real switch steps")
flags.DEFINE_list("handoffs", list(ablation_config.HANDOFFS),
                  "optimizer handoffs (copy, scaled, reinit; reinit re-warms up over "
                  f"{ablation_config.REINIT_WARMUP} steps)")
flags.DEFINE_list("seeds", ["0", "1"], "seeds; scratch and the best setting run with each "
                  "seed after the first")
flags.DEFINE_bool("moe", True, "also run the MoE pair (moe_scratch vs moe_<best>)")
flags.DEFINE_string("best", "", "the P2R variant to repeat and to run as MoE, e.g. "
                    "p2r_300_scaled ('' = the best of the seed-0 dense runs)")
flags.DEFINE_list("groups", ["sweep", "seeds", "moe"], "which runs: sweep (scratch and "
                  "every switch x handoff), seeds (scratch and the best again with each further "
                  "seed), moe (the MoE pair); without sweep, --best must name the best")
flags.DEFINE_integer("window", 50, "steps of the trailing mean of the training loss")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS

PAPER = ("M6-10T (Lin et al. 2021): Pseudo-to-Real converges about 7x faster at 10T "
         "parameters; it reaches the pretraining loss of the model trained without it in "
         "6% of the time.")
COLUMNS = ["run", "switch_step", "optimizer_handoff", "seed", "final_loss",
           "steps_to_scratch_loss", "fraction_of_scratch_steps", "wall_s_to_scratch_loss",
           "scratch_steps_to_final_loss",
           "eval_loss", "pseudo_step_ms", "real_step_ms", "train_s",
           "planned_m6_10t_wall_s", "planned_m6_10t_wall_s_to_scratch_loss"]


def planned_m6_10t_step_s():
    """{stage: planned step seconds} of the paper's 10T model on its 512 GPUs (the dry
    run's model: the Pseudo giant resident and compute-bound, the Real giant streaming
    every layer from host memory): the wall-time regime the paper reports. Planned, not
    measured."""
    import m6_10t
    from m6jax import plan
    c = m6_10t.get_config("paper")
    return {stage: plan.plan(c, stage=stage)["step_s"] for stage in ("pseudo", "real")}


def smoothed(rows, window, task_weights):
    """[(step, task-balanced trailing loss)] over logged rows: per task, the mean of its
    logged losses within `window` steps, then those means weighted by the data's task
    weights (renormalised over the tasks present). A batch of 8 mixes tasks whose losses
    differ 10x (captioning ~0.5, LM ~6), so the plain trailing mean of `loss` swings with
    the batches' task mix by more than the runs differ; this does not."""
    out = []
    for i, r in enumerate(rows):
        recent = [x for x in rows[: i + 1] if x["step"] > r["step"] - window]
        num = den = 0.0
        for task, weight in task_weights.items():
            losses = [x[f"loss/{task}"] for x in recent if f"loss/{task}" in x]
            if losses and weight:
                num, den = num + weight * sum(losses) / len(losses), den + weight
        out.append((r["step"], num / den if den else r["loss"]))
    return out


def first_reaching(curve, target):
    """The first step whose trailing loss is at or below `target`, or nan."""
    return next((s for s, loss in curve if loss <= target), math.nan)


def stage_step_s(rows):
    """{stage: median logged step time (s)} of a run's metrics rows."""
    out = {}
    for stage, flag in (("pseudo", 1.0), ("real", 0.0)):
        times = [r["step_s"] for r in rows if r.get("pseudo_stage", 0.0) == flag]
        out[stage] = statistics.median(times) if times else math.nan
    return out


def modelled_wall_s(step, switch, step_s):
    """Seconds to reach `step` at the measured median step time of each stage."""
    if math.isnan(step):
        return math.nan
    pseudo_steps = min(step, switch) if switch else 0
    return pseudo_steps * (step_s["pseudo"] if pseudo_steps else 0.0) + \
        (step - pseudo_steps) * step_s["real"]


class Ablation:
    def __init__(self, workdir):
        self.workdir = workdir
        self.tokenizer = os.path.join(workdir, "tokenizer.model")  # trained once, shared
        self.runs = {}  # name -> dict(variant, seed, rows, summary)
        self.planned = planned_m6_10t_step_s()

    def run(self, name, variant, seed):
        from m6jax.train.loop import train
        c = ablation_config.get_config(variant)
        c.seed = seed
        c.total_steps = FLAGS.steps
        c.eval_every = 10 * FLAGS.steps
        c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, FLAGS.steps // 4)
        if c.model.share_layers:  # a short --steps: the re-warmup fits in what is left
            c.pseudo_to_real.switch_warmup_steps = min(
                c.pseudo_to_real.switch_warmup_steps, FLAGS.steps - c.pseudo_to_real.switch_step)
        c.data.tokenizer_path = self.tokenizer
        run_dir = os.path.join(self.workdir, name)
        summary_path = os.path.join(run_dir, "summary.json")
        if os.path.exists(summary_path):
            logging.info("p2r ablation: %s done before, reading it", name)
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
        else:
            logging.info("p2r ablation: %s (%s, seed %d)", name, variant, seed)
            t0 = time.time()
            summary = train(c, run_dir)
            print(f"p2r ablation: {name} took {time.time() - t0:.0f} s", flush=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        self.runs[name] = dict(variant=variant, seed=seed, rows=rows, summary=summary,
                               moe=variant.startswith("moe_"), config=c,
                               curve=smoothed(rows, FLAGS.window, dict(c.data.task_weights)))

    def scratch_of(self, r):
        return next(x for x in self.runs.values() if x["seed"] == r["seed"]
                    and x["moe"] == r["moe"] and x["variant"].endswith("scratch"))

    def table(self):
        rows = []
        for name, r in self.runs.items():
            ref = self.scratch_of(r)
            curve, target = r["curve"], ref["curve"][-1][1]
            step = first_reaching(curve, target)
            sec = r["config"].pseudo_to_real
            switch = int(sec.switch_step) if r["config"].model.share_layers else 0
            handoff = "none" if not switch else sec.optimizer + (
                f"+warmup{int(sec.switch_warmup_steps)}" if sec.switch_warmup_steps else "")
            step_s = stage_step_s(r["rows"])
            rows.append(dict(
                run=name, switch_step=switch, optimizer_handoff=handoff, seed=r["seed"],
                final_loss=round(curve[-1][1], 4), steps_to_scratch_loss=step,
                fraction_of_scratch_steps=round(step / ref["summary"]["total_steps"], 3),
                scratch_steps_to_final_loss=first_reaching(ref["curve"], curve[-1][1]),
                wall_s_to_scratch_loss=round(modelled_wall_s(step, switch, step_s), 1),
                eval_loss=round(r["summary"]["eval_loss"], 4),
                pseudo_step_ms=round(1000 * step_s["pseudo"], 1) if switch else math.nan,
                real_step_ms=round(1000 * step_s["real"], 1),
                train_s=round(r["summary"]["train_s"], 1),
                planned_m6_10t_wall_s=round(modelled_wall_s(len(curve) and curve[-1][0], switch,
                                                            self.planned), 1),
                planned_m6_10t_wall_s_to_scratch_loss=round(
                    modelled_wall_s(step, switch, self.planned), 1)))
        return rows


def best_variant(rows):
    """The seed-0 dense P2R run that reached scratch's loss first (then: lowest loss)."""
    p2r = [r for r in rows if r["switch_step"] and r["seed"] == int(FLAGS.seeds[0])
           and not r["run"].startswith("moe_")]
    key = lambda r: (math.inf if math.isnan(r["steps_to_scratch_loss"])  # noqa: E731
                     else r["steps_to_scratch_loss"], r["final_loss"])
    return min(p2r, key=key)["run"]


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    ab = Ablation(FLAGS.workdir)
    seed0, more_seeds = int(FLAGS.seeds[0]), [int(s) for s in FLAGS.seeds[1:]]
    if "sweep" in FLAGS.groups:
        ab.run("scratch", "scratch", seed0)
        for s in FLAGS.switch_steps:
            for h in FLAGS.handoffs:
                ab.run(f"p2r_{int(s)}_{h}", f"p2r_{int(s)}_{h}", seed0)
        _write(ab.table(), ab, partial=True)
    elif not FLAGS.best:
        raise app.UsageError("--groups without sweep needs --best=<the P2R variant>")
    best = FLAGS.best or best_variant(ab.table())
    print(f"p2r ablation: best setting {best}", flush=True)
    for seed in more_seeds if "seeds" in FLAGS.groups else ():
        ab.run(f"scratch_seed{seed}", "scratch", seed)
        ab.run(f"{best}_seed{seed}", best, seed)
        _write(ab.table(), ab, partial=True)
    if FLAGS.moe and "moe" in FLAGS.groups:
        ab.run("moe_scratch", "moe_scratch", seed0)
        ab.run(f"moe_{best}", f"moe_{best}", seed0)
    _write(ab.table(), ab, partial=False, best=best)


_REACHED = ("steps_to_scratch_loss", "fraction_of_scratch_steps", "wall_s_to_scratch_loss",
            "scratch_steps_to_final_loss", "planned_m6_10t_wall_s_to_scratch_loss")


def _fmt(column, v):
    if isinstance(v, float) and math.isnan(v):
        return "not reached" if column in _REACHED else "-"
    return str(v)


def _write(rows, ab, partial, best=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(FLAGS.workdir, "p2r_ablation.csv"), "w", newline="",
              encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)

    colors = dict(copy="tab:red", scaled="tab:green", reinit="tab:blue")
    styles = {int(s): ls for s, ls in zip(FLAGS.switch_steps, ("-", "--", ":"))}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    by_name = {r["run"]: r for r in rows}
    for name, r in ab.runs.items():
        steps, loss = zip(*r["curve"])
        row = by_name[name]
        switch = row["switch_step"]
        handoff = row["optimizer_handoff"].split("+")[0]
        first_seed_dense = r["seed"] == int(FLAGS.seeds[0]) and not r["moe"]
        kw = dict(color=colors.get(handoff, "black"), ls=styles.get(switch, "-"), lw=1.0)
        if first_seed_dense:
            axes[0].plot(steps, loss, label=name, **kw)
            step_s = stage_step_s(r["rows"])
            secs = [modelled_wall_s(s, switch, step_s) for s in steps]
            axes[2].plot(secs, loss, label=name, **kw)
        if not first_seed_dense or name in ("scratch", best):
            kw.update(ls="-" if r["seed"] == int(FLAGS.seeds[0]) else "--",
                      color=("tab:purple" if r["moe"] else kw["color"]),
                      lw=1.6 if r["moe"] else 1.0)
            if r["moe"] and not switch:
                kw["color"] = "gray"
            axes[1].plot(steps, loss, label=name, **kw)
    targets = sorted({round(ab.scratch_of(r)["curve"][-1][1], 4) for r in ab.runs.values()})
    for ax, xlabel, title in zip(
            axes, ("step", "step", "modelled wall time (s, from CPU-measured step times)"),
            ("dense, seed 0: every switch x handoff", "seeds and the MoE pair",
             "dense, seed 0, vs CPU step-time model")):
        for t in targets:
            ax.axhline(t, color="gray", lw=0.6, ls=":")
        lo = min(targets) - 0.2
        ax.set_ylim(lo, lo + 2.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"training loss (task-balanced, {FLAGS.window}-step trailing)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"Pseudo-to-Real vs from scratch, {ablation_config.NUM_LAYERS} layers x "
                 f"width {ablation_config.EMB_DIM}, {FLAGS.steps} steps (dotted: each "
                 f"scratch run's final loss){' [partial]' if partial else ''}", fontsize=10)
    fig.text(0.01, 0.01, "Paper: " + PAPER + " Colours: red copy, green scaled, blue "
             "reinit+warmup; line style: switch step.", fontsize=7, wrap=True)
    fig.subplots_adjust(bottom=0.15, left=0.04, right=0.99, wspace=0.2)
    fig.savefig(os.path.join(FLAGS.workdir, "p2r_ablation.png"), dpi=110)
    plt.close(fig)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    note = (f"Ours ({FLAGS.steps} steps, {ablation_config.NUM_LAYERS}-layer width-"
            f"{ablation_config.EMB_DIM} M6, batch {ablation_config.BATCH_SIZE}, this CPU"
            f"{'; PARTIAL: not every run has finished' if partial else ''}"
            f"{f'; best setting {best}' if best else ''}). wall_s_to_scratch_loss is "
            "modelled from CPU-measured step times (median per stage), not a GPU "
            "measurement. planned_m6_10t_* are the same step counts at the dry run's "
            "planned step times of m6_10t on 512 GPUs (Pseudo stage "
            f"{ab.planned['pseudo']:.2f} s, compute-bound; Real stage with every "
            f"layer streamed {ab.planned['real']:.2f} s, transfer-bound): planned, "
            "not measured.")
    with open(os.path.join(FLAGS.workdir, "p2r_ablation.md"), "w", encoding="utf-8") as f:
        f.write(f"Paper: {PAPER}\n\n{note}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    app.run(main)

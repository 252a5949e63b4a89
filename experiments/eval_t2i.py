r"""Re-evaluate a text-to-image run's newest checkpoint (the t2i_* numbers of summary.json)
with other decoding settings, without training:

  python experiments/eval_t2i.py --workdir=/tmp/t2i --temperature=0.7 --json=/tmp/eval.json

Flags left at -1 take the run's config.t2i values.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from m6jax import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A text-to-image pretraining run's --workdir.")
flags.mark_flags_as_required(["workdir"])
_FIELDS = {name: flags.DEFINE_float(name, -1.0, f"t2i.{name} (-1 = the run's)")
           for name in ("temperature", "top_k", "top_p", "guidance_scale", "mask_steps",
                        "mask_temperature", "choice_temperature", "eval_samples_per_digit")}
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed of the samples.")
_JSON = flags.DEFINE_string("json", "", "Write the numbers here.")


def main(argv):
    if len(argv) > 1:
        cli.refuse(f"flag error: unexpected arguments {argv[1:]}")
    from m6jax.data import Pipeline
    from m6jax.decoding.run import load_run
    from m6jax.t2i import evaluate, vocab
    workdir = os.path.abspath(_WORKDIR.value)
    try:
        config, model, mesh, params, _, _ = load_run(workdir)
        if not vocab.enabled(config):
            raise ValueError(f"the run in {workdir} has no text_to_image task")
        pipe = Pipeline(config.data, seed=config.seed, batch_size=1, workdir=workdir)
    except ValueError as e:
        cli.refuse(f"input error: {e}")
    for name, flag in _FIELDS.items():
        if flag.value >= 0:
            config.t2i[name] = type(config.t2i[name])(flag.value)
    out = evaluate.evaluate(config, model, mesh, params, pipe, seed=_SEED.value)
    out["t2i_settings"] = config.t2i.to_dict()
    print(json.dumps(out, indent=2, ensure_ascii=False))
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

"""Every bad input a user can type is refused before anything compiles: one line naming
the field or file and the fix, exit status 2, no traceback.

Each case runs an entry point (experiments/pretrain.py, generate.py, finetune.py) as a
user would, in a subprocess. The subprocesses start together (two at a time) when the
module's first test asks for its result, so the ~2 s each spends importing JAX overlaps.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT

EXIT_BAD_INPUT = 2
# A refusal comes before any compile: a tiny run that got as far as its first step
# takes longer than this here, a refusal ~2-5 s (JAX import + abstract shapes).
MAX_SECONDS = 40

PRETRAIN = "experiments/pretrain.py"
GENERATE = "experiments/generate.py"
FINETUNE = "experiments/finetune.py"
SENTIMENT = "--config=experiments/configs/finetune_sentiment.py"


def _texts(n=200):
    return "\n".join(f"line {i}: 今天天气很好 the weather number {i} is fine" for i in range(n))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "good.txt").write_text(_texts(), encoding="utf-8")
    (d / "empty.txt").write_text("", encoding="utf-8")
    (d / "notes.csv").write_text("a,b\n", encoding="utf-8")
    (d / "blank.txt").write_text("\n   \n\n", encoding="utf-8")
    (d / "all_bad.jsonl").write_text('{"image": [[0.5]], "caption": "x"\nnot json\n[1, 2]\n',
                                     encoding="utf-8")
    (d / "no_caption.jsonl").write_text('{"image": [[0.5]]}\n' * 10, encoding="utf-8")
    (d / "not_an_image.png").write_text("these are not PNG bytes", encoding="utf-8")
    (d / "a_file").write_text("x", encoding="utf-8")
    (d / "empty_dir").mkdir()
    return d


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A workdir with one checkpoint of a 32-wide tiny model (written in-process, no
    tokenizer): another model shape than m6.py:tiny's, and no tokenizer.model."""
    import jax
    from helpers import tiny_config
    from m6jax import checkpoint, sharding
    from m6jax.train import stages
    from m6jax.train.state import create_train_state, dummy_batch
    workdir = tmp_path_factory.mktemp("saved_run")
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    model, tx = stages.model_and_optimizer(config, "real")
    state, _ = create_train_state(model, tx, dummy_batch(8, 16, 4, 12), mesh, 0)
    ckpt = checkpoint.Checkpointer(str(workdir), config)
    ckpt.save(1, state, dict(data={"step": 1}, stage="real",
                             config=checkpoint.config_json(config)), force=True)
    ckpt.wait()
    ckpt.close()
    # And a run whose checkpoint lost its meta item.
    broken = tmp_path_factory.mktemp("no_meta_run")
    (broken / "checkpoints" / "1" / "meta").mkdir(parents=True)
    (broken / "checkpoints" / "1" / "state").mkdir()
    return workdir, broken


def _cases(files, run, broken, out):
    """(id, entry point, args, what the one line must contain)."""
    w = f"--workdir={out}"
    p = lambda *a: (PRETRAIN, [*a, w])  # noqa: E731
    return {
        # ---- flags and config files
        "unknown_field": (*p("--config.data.text_lenght=3"),
                          "flag error: --config.data.text_lenght: 'text_lenght' is not a field "
                          "of this config; did you mean 'text_len'?"),
        "bad_type": (*p("--config.batch_size=abc"), "--config.batch_size=abc: invalid literal"),
        "missing_config_file": (*p("--config=experiments/configs/nope.py:tiny"),
                                "--config=experiments/configs/nope.py: no such config file"),
        "unknown_variant": (*p("--config=experiments/configs/m6.py:huge"),
                            "unknown variant 'huge' of experiments/configs/m6.py; use one of"),
        "stray_argument": (*p("tiny"), "unexpected arguments ['tiny']"),
        # ---- top-level run fields
        "batch_size_0": (*p("--config.batch_size=0"), "config error: batch_size=0 must be positive"),
        "batch_not_divisible": (*p("--config.batch_size=12"),
                                "batch_size=12 is not divisible by mesh.data*mesh.fsdp*mesh.expert=8"),
        "total_steps_0": (*p("--config.total_steps=0"), "total_steps=0 must be positive"),
        "seed_negative": (*p("--config.seed=-1"), "seed=-1 must be >= 0"),
        "checkpoint_every": (*p("--config.checkpoint_every=-1"), "checkpoint_every=-1 must be >= 0"),
        "keep_checkpoints": (*p("--config.keep_checkpoints=0"), "keep_checkpoints=0 must be >= 1"),
        "nonfinite_policy": (*p("--config.nonfinite_policy=ignore"),
                             "nonfinite_policy='ignore' is not one of skip, stop"),
        "init_from_missing": (*p(f"--config.init_from={files / 'nowhere'}"),
                              f"init_from={str(files / 'nowhere')!r} does not exist"),
        # ---- model, mesh, optimizer, P2R, offload, MoE
        "heads_divide": (*p("--config.model.num_heads=6"),
                         "model.num_heads=6 does not divide model.emb_dim=128"),
        "float16": (*p("--config.model.dtype=float16", "--config.optimizer.loss_scale=none"),
                    "model.dtype='float16' with optimizer.loss_scale='none'"),
        "dropout_1": (*p("--config.model.dropout_rate=1.0"), "model.dropout_rate=1.0 must be in [0, 1)"),
        "mesh_product": (*p("--config.mesh.data=3"), "multiply to 3 but there are 8 devices"),
        "mesh_zero": (*p("--config.mesh.tensor=0"), "mesh.tensor=0 must be a positive size or -1"),
        "learning_rate": (*p("--config.optimizer.learning_rate=-0.1"),
                          "optimizer.learning_rate=-0.1 must be positive"),
        "adam_b2": (*p("--config.optimizer.b2=1.0"), "optimizer.b2=1.0 must be in [0, 1)"),
        # (A warmup past total_steps is clamped, not refused: test_first_day.py.)
        "warmup": (*p("--config.optimizer.warmup_steps=-1"),
                   "optimizer.warmup_steps=-1 must be in [0, total_steps=1000)"),
        "grad_clip": (*p("--config.optimizer.grad_clip_norm=0.0"),
                      "optimizer.grad_clip_norm=0.0 must be positive"),
        "p2r_needs_sharing": (*p("--config.pseudo_to_real.switch_step=10"),
                              "pseudo_to_real.switch_step=10 needs model.share_layers=True"),
        "offload_layer": (*p("--config.offload.param_layers=7"),
                          "offload.param_layers='7': layer 7 is not in [0, model.num_layers=4)"),
        "moe_k": (PRETRAIN, ["--config=experiments/configs/m6_moe.py:tiny",
                             "--config.model.moe.k=0", w],
                  "model.moe.k=0 must be in [1, model.moe.num_experts=8]"),
        # ---- data fields and files
        "text_len": (*p("--config.data.text_len=4"), "data.text_len=4 is too small; use at least 8"),
        "patch_size": (*p("--config.data.patch_size=3"),
                       "data.patch_size=3 does not divide data.image_size=8"),
        "task_weight": (*p("--config.data.task_weights.lm=-1.0"),
                        "data.task_weights.lm=-1.0 must be >= 0"),
        "glob_matches_nothing": (*p(f"--config.data.text_files={files}/corpus/*.txt"),
                                 f"data.text_files: pattern '{files}/corpus/*.txt' matches no file"),
        "empty_text_file": (*p(f"--config.data.text_files={files / 'empty.txt'}"),
                            f"data.text_files: '{files / 'empty.txt'}' is empty"),
        "wrong_suffix": (*p(f"--config.data.text_files={files / 'notes.csv'}"),
                         f"data.text_files: '{files / 'notes.csv'}' is not one of .txt"),
        "blank_text_file": (*p(f"--config.data.text_files={files / 'blank.txt'}",
                               f"--config.data.image_text_files={files / 'all_bad.jsonl'}"),
                            "input error: data.text_files: need texts in both splits, got 0 train"),
        "jsonl_nothing_valid": (*p(f"--config.data.text_files={files / 'good.txt'}",
                                   f"--config.data.image_text_files={files / 'all_bad.jsonl'}"),
                                f"input error: data.image_text_files: {files / 'all_bad.jsonl'} has "
                                "no valid JSON-lines record (3 malformed; first: line 1"),
        "jsonl_no_caption": (*p(f"--config.data.text_files={files / 'good.txt'}",
                                f"--config.data.image_text_files={files / 'no_caption.jsonl'}"),
                             f"{files / 'no_caption.jsonl'} lacks field(s) ['caption']"),
        # ---- workdirs and checkpoints
        "workdir_is_file": (PRETRAIN, [f"--workdir={files / 'a_file'}"],
                            f"--workdir={files / 'a_file'} is a file, not a directory"),
        "workdir_under_file": (PRETRAIN, [f"--workdir={files / 'a_file' / 'run'}"],
                               f"cannot be created: {files / 'a_file'} is a file"),
        "checkpoint_other_shape": (PRETRAIN, [f"--workdir={run}"],
                                   f"input error: checkpoint step 1 in {run / 'checkpoints'} does "
                                   "not fit this config"),
        # ---- generate.py
        "generate_no_checkpoint": (GENERATE, [f"--workdir={files / 'empty_dir'}"],
                                   f"input error: no checkpoint in {files / 'empty_dir' / 'checkpoints'}"),
        "generate_workdir_missing": (GENERATE, [f"--workdir={files / 'nowhere'}"],
                                     f"--workdir={files / 'nowhere'} is not a directory"),
        "generate_top_p": (GENERATE, [f"--workdir={run}", "--top_p=0"],
                           "flag error: --top_p=0.0 must be in (0, 1]"),
        "generate_num_samples": (GENERATE, [f"--workdir={run}", "--num_samples=0"],
                                 "--num_samples=0 must be >= 1"),
        "generate_image_and_prompt": (GENERATE, [f"--workdir={run}", "--image=x.png", "--prompt=hi"],
                                      "give --image (caption it) or --prompt"),
        "generate_beam_size": (GENERATE, [f"--workdir={run}", "--beam_size=0"],
                               "--beam_size=0 must be >= 1"),
        "generate_temperature": (GENERATE, [f"--workdir={run}", "--temperature=-1"],
                                 "--temperature=-1.0 must be >= 0 (0 = greedy)"),
        "generate_top_k": (GENERATE, [f"--workdir={run}", "--top_k=-5"], "--top_k=-5 must be >= 0"),
        "generate_strategy": (GENERATE, [f"--workdir={run}", "--strategy=nucleus"],
                              "flag --strategy=nucleus: value should be one of <greedy|sample|beam|mask>"),
        "generate_image_missing": (GENERATE, [f"--workdir={run}", f"--image={files / 'no.png'}"],
                                   f"--image={files / 'no.png'}: no such file"),
        "generate_image_unreadable": (GENERATE, [f"--workdir={run}",
                                                 f"--image={files / 'not_an_image.png'}"],
                                      f"--image={files / 'not_an_image.png'} cannot be read as an "
                                      "image"),
        "generate_no_tokenizer": (GENERATE, [f"--workdir={run}"],
                                  f"input error: no tokenizer at {run / 'tokenizer.model'}"),
        "generate_no_meta": (GENERATE, [f"--workdir={broken}"],
                             f"input error: cannot read the run's config from "
                             f"{broken / 'checkpoints' / '1' / 'meta' / 'metadata'}"),
        # ---- finetune.py
        "finetune_no_init_from": (FINETUNE, [SENTIMENT, w], "config error: config.init_from is empty"),
        "finetune_no_config": (FINETUNE, [w], "Flag --config must have a value other than None"),
        "finetune_unknown_field": (FINETUNE, [SENTIMENT, "--config.optimizer.lr=0.1", w],
                                   "--config.optimizer.lr: 'lr' is not a field of this config"),
        "finetune_init_from_missing": (FINETUNE, [SENTIMENT, f"--config.init_from={files / 'nowhere'}", w],
                                       "is not a directory"),
        "finetune_no_checkpoint": (FINETUNE, [SENTIMENT, f"--config.init_from={files / 'empty_dir'}", w],
                                   "holds no checkpoint"),
        "finetune_no_tokenizer": (FINETUNE, [SENTIMENT, f"--config.init_from={run}", w],
                                  "the pretraining tokenizer"),
        "finetune_score_batch": (FINETUNE, [SENTIMENT, f"--config.init_from={run}",
                                            "--config.score_batch=0", w],
                                 "config error: score_batch=0 must be positive"),
    }


def _run(entry, args, cache):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", M6JAX_CACHE=str(cache))
    t0 = time.time()
    # A case that is not refused would train a whole run: stop it well before that.
    proc = subprocess.run([sys.executable, entry, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3 * MAX_SECONDS)
    return proc, time.time() - t0


@pytest.fixture(scope="module")
def results(files, saved_run, tmp_path_factory, request):
    run, broken = saved_run
    out = tmp_path_factory.mktemp("out")
    cache = tmp_path_factory.mktemp("cache")
    # Each case its own workdir, so a case that wrongly trains fails only itself.
    cases = {k: (entry, [f"--workdir={out / k}" if a == f"--workdir={out}" else a for a in args],
                 expected)
             for k, (entry, args, expected) in _cases(files, run, broken, out).items()}
    # Only the cases this session selected (the slow ones run with -m slow); the costly
    # ones first, so the cheap flag errors fill the gaps.
    selected = {item.callspec.params["case"] for item in request.session.items
                if item.module is sys.modules[__name__] and hasattr(item, "callspec")
                and "case" in item.callspec.params}
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {}
    for k in sorted(cases, key=lambda k: k in FAST[:17]):
        if k in selected:
            entry, args, _ = cases[k]
            futures[k] = pool.submit(_run, entry, args, cache)
    yield {k: (cases[k][2], f) for k, f in futures.items()}, out
    pool.shutdown(wait=True)


# The list is fixed here so pytest can name each case; _cases holds their arguments.
# Flag errors cost ~0.2 s (refused before JAX is imported), config errors ~2 s, data and
# checkpoint cases 3-5 s: the default suite runs one or more of every kind, the slow set
# the rest (each of those fields is also checked in-process in test_config_checks.py).
FAST = [
    "unknown_field", "bad_type", "missing_config_file", "unknown_variant", "stray_argument",
    "workdir_is_file", "workdir_under_file", "generate_workdir_missing", "generate_top_p",
    "generate_num_samples", "generate_image_and_prompt", "generate_beam_size",
    "generate_temperature", "generate_top_k", "generate_strategy", "finetune_no_config",
    "finetune_unknown_field",
    "batch_size_0", "heads_divide", "float16", "mesh_product", "learning_rate",
    "p2r_needs_sharing", "offload_layer", "moe_k", "text_len", "init_from_missing",
    "glob_matches_nothing", "empty_text_file", "wrong_suffix", "jsonl_nothing_valid",
    "checkpoint_other_shape", "generate_no_tokenizer", "finetune_no_init_from",
    "finetune_no_tokenizer",
]
SLOW = [
    "batch_not_divisible", "total_steps_0", "seed_negative", "checkpoint_every",
    "keep_checkpoints", "nonfinite_policy", "dropout_1", "mesh_zero", "adam_b2", "warmup",
    "grad_clip", "patch_size", "task_weight", "blank_text_file", "jsonl_no_caption",
    "generate_no_checkpoint", "generate_no_meta", "generate_image_missing",
    "generate_image_unreadable", "finetune_init_from_missing", "finetune_no_checkpoint",
    "finetune_score_batch",
]
CASES = [pytest.param(c, id=c) for c in FAST] + [
    pytest.param(c, id=c, marks=pytest.mark.slow) for c in SLOW]


def test_the_case_list_is_the_fixture_list(files, tmp_path):
    assert sorted(FAST + SLOW) == sorted(_cases(files, tmp_path, tmp_path, tmp_path))
    assert len(FAST) >= 25


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_in_one_line(results, case):
    by_case, out = results
    expected, future = by_case[case]
    proc, seconds = future.result()
    everything = proc.stdout + proc.stderr
    assert "Traceback" not in everything, everything[-3000:]
    assert proc.returncode == EXIT_BAD_INPUT, everything[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert expected in last, (expected, last)
    assert seconds < MAX_SECONDS, f"{case} took {seconds:.0f} s to refuse"
    # Nothing was trained: no metrics, no checkpoint of this run.
    assert not (out / case / "metrics.jsonl").exists()
    assert not [d for d in (out / case / "checkpoints").glob("*") if d.name.isdigit()]


def test_malformed_jsonl_lines_are_counted_bad_records(files, tmp_path):
    """One malformed line among good records: the file loads, the line is a bad record."""
    from helpers import tiny_config
    from m6jax.data import Pipeline
    good = [json.dumps({"image": [[i / 40.0] * 8] * 8, "caption": f"the number {i % 10}",
                        "label": i % 10}) for i in range(40)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(good[:7] + ['{"image": [[0.1]], "caption": '] + good[7:]
                              + ["[1, 2, 3]"]) + "\n", encoding="utf-8")
    config = tiny_config()
    config.data.update(text_files=str(files / "good.txt"), image_text_files=str(path),
                       vocab_size=300, text_len=32)
    config.model.vocab_size = 300
    pipe = Pipeline(config, seed=0, batch_size=4, workdir=str(tmp_path),
                    cache_dir=str(tmp_path / "cache"))
    assert len(pipe.images) == 40  # the 40 good records, none lost
    assert pipe.images.num_malformed == 2
    assert pipe.counters()["bad_records"] == 2 + pipe.text.num_bad

"""Pseudo-to-Real and offload through the entry point: kill a run before and after the
switch, rerun the same command, and the loss curve is the uninterrupted one; a Real run
starts from another run's Pseudo checkpoint; offload leaves the curve unchanged.
Subprocesses on 2 fake devices, as in test_checkpoint.py."""
import json
import signal

import pytest

import test_checkpoint
from test_checkpoint import _losses, _metrics, _steps, cache  # noqa: F401

# The dense tiny model of test_checkpoint.py (its own runs are MoE with dropout/jitter,
# whose one scanned unit spans both layers; these tests read per-layer shapes).
def _run(*a, **k):
    return test_checkpoint._run(*a, args=test_checkpoint.DENSE_ARGS, **k)


def _run_until(*a, **k):
    return test_checkpoint._run_until(*a, args=test_checkpoint.DENSE_ARGS, **k)


SWITCH = 5  # checkpoints every 3 steps: 3 is Pseudo, 6 and 9 are Real
BASE = ["--config.model.share_layers=True", f"--config.pseudo_to_real.switch_step={SWITCH}",
        "--config.keep_checkpoints=4"]
# Each optimizer handoff, the re-warmup on with two of them (the Real step 6 checkpoint is
# then inside the ramp: its learning rate depends on the step it resumes at).
HANDOFFS = {"scaled": ["--config.pseudo_to_real.optimizer=scaled",
                       "--config.pseudo_to_real.switch_warmup_steps=3"],
            "copy": ["--config.pseudo_to_real.optimizer=copy"],
            "reinit": ["--config.pseudo_to_real.optimizer=reinit",
                       "--config.pseudo_to_real.switch_warmup_steps=3"]}
P2R = BASE + HANDOFFS["scaled"]  # the default suite's mode; the others run in the slow set


def _meta(workdir, step):
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


@pytest.fixture(scope="module")
def p2r_reference(tmp_path_factory, cache):  # noqa: F811
    workdir = tmp_path_factory.mktemp("p2r_reference")
    proc = _run(workdir, cache, P2R)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pseudo-to-real: delinked at step {SWITCH} (optimizer scaled" in proc.stderr
    return workdir


def test_checkpoints_record_the_stage(p2r_reference):
    stages = [_meta(p2r_reference, s)["stage"] for s in _steps(p2r_reference)]
    assert stages == ["pseudo", "real", "real", "real"]  # steps 3, 6, 9, 10
    rows = _metrics(p2r_reference)
    assert [r["pseudo_stage"] for r in rows] == [1.0] * SWITCH + [0.0] * (10 - SWITCH)
    assert json.loads((p2r_reference / "summary.json").read_text())["stage"] == "real"


@pytest.fixture(scope="module")
def mode_references(tmp_path_factory, cache):  # noqa: F811
    """{handoff: workdir of its uninterrupted run}, made on first use (slow tests only)."""
    made = {}

    def get(mode):
        if mode not in made:
            workdir = tmp_path_factory.mktemp(f"p2r_reference_{mode}")
            proc = _run(workdir, cache, BASE + HANDOFFS[mode])
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert f"delinked at step {SWITCH} (optimizer {mode}" in proc.stderr
            made[mode] = workdir
        return made[mode]
    return get


@pytest.mark.parametrize("kill_after,resumed_from,stage", [
    pytest.param(4, 3, "pseudo", marks=pytest.mark.slow),  # ~20 s; the Real side stays default
    (7, 6, "real")])
def test_killed_run_resumes_across_the_switch_bitwise(p2r_reference, cache, tmp_path,  # noqa: F811
                                                      kill_after, resumed_from, stage):
    code, _, _ = _run_until(tmp_path, cache, logged_step=kill_after, sig=signal.SIGKILL,
                            extra=P2R)
    assert code == -signal.SIGKILL
    assert _steps(tmp_path)[-1] == resumed_from, "the kill landed too late or too early"
    assert _meta(tmp_path, resumed_from)["stage"] == stage
    proc = _run(tmp_path, cache, P2R)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {resumed_from}" in proc.stderr
    assert _losses(tmp_path) == _losses(p2r_reference)  # float equality of every loss


@pytest.mark.slow  # three entry-point runs per case (~25 s each)
@pytest.mark.parametrize("mode", ["copy", "reinit"])
@pytest.mark.parametrize("kill_after,resumed_from,stage", [(4, 3, "pseudo"), (7, 6, "real")])
def test_every_handoff_resumes_across_the_switch_bitwise(mode_references, cache, tmp_path,  # noqa: F811
                                                         mode, kill_after, resumed_from, stage):
    reference = mode_references(mode)
    code, _, _ = _run_until(tmp_path, cache, logged_step=kill_after, sig=signal.SIGKILL,
                            extra=BASE + HANDOFFS[mode])
    assert code == -signal.SIGKILL
    assert _steps(tmp_path)[-1] == resumed_from, "the kill landed too late or too early"
    assert _meta(tmp_path, resumed_from)["stage"] == stage
    proc = _run(tmp_path, cache, BASE + HANDOFFS[mode])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {resumed_from}" in proc.stderr
    assert _losses(tmp_path) == _losses(reference)


@pytest.mark.slow  # one more entry-point run (~25 s): the default suite stays under 15 min
def test_real_run_starts_from_another_runs_pseudo_checkpoint(p2r_reference, cache, tmp_path):  # noqa: F811
    pseudo_ckpt = p2r_reference / "checkpoints" / "3"
    assert _meta(p2r_reference, 3)["stage"] == "pseudo"
    proc = _run(tmp_path, cache, [f"--config.init_from={pseudo_ckpt}", "--config.total_steps=2",
                                  "--config.optimizer.warmup_steps=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "init_from: delinking the Pseudo (shared-layer) params" in proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    fresh = json.loads((p2r_reference / "summary.json").read_text())["initial_eval_loss"]
    assert summary["stage"] == "real" and summary["initial_eval_loss"] < fresh - 0.05


@pytest.mark.slow  # one more entry-point run; tests/test_offload.py covers it in-process
def test_offload_through_the_entry_point_keeps_the_loss_curve(p2r_reference, cache, tmp_path):  # noqa: F811
    proc = _run(tmp_path, cache, P2R + ["--config.offload.optimizer_layers=0",
                                        "--config.offload.param_layers=all"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MB offloaded to host" in proc.stderr
    # Equal to float rounding, not bitwise: the streamed update sums the global gradient
    # norm unit by unit from host memory, the resident one in one reduction, and on some
    # CPUs XLA rounds the two orders differently (seen here: 4.8e-7, one float32 ulp, at
    # step 8; bitwise equal on the machine of the previous round). A wrong update or
    # layout is orders of magnitude further off.
    ours, ref = _losses(tmp_path), _losses(p2r_reference)
    assert [s for s, _ in ours] == [s for s, _ in ref]
    assert [x for _, x in ours] == pytest.approx([x for _, x in ref], rel=1e-5)
    # Checkpoints hold the ordinary layout: the Real stage's per-layer arrays.
    assert _steps(tmp_path) == _steps(p2r_reference)


def test_generate_and_finetune_load_a_delinked_run(p2r_reference):
    from configs import finetune_caption
    from m6jax.decoding.run import load_run
    from m6jax.finetune import pretrained
    config, _, _, params, _, _ = load_run(str(p2r_reference))  # config says share_layers
    assert not config.model.share_layers
    assert params["stack"]["layers"]["attn"]["query"].shape[0] == 2  # per-layer params
    pre = pretrained.resolve(str(p2r_reference))
    assert pre.stage == "real"
    assert not pretrained.run_config(finetune_caption.get_config(), pre).model.share_layers

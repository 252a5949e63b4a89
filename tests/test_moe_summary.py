"""summary.json's MoE fields, also when a finished run is rerun and no step executes."""
import numpy as np

from m6jax.train import moe_metrics


def test_summary_reads_the_last_step_metrics():
    m = {"moe/load": np.ones((2, 4)) / 4, "moe/load_max_over_mean": 1.5, "moe/dropped_fraction": 0.1}
    assert moe_metrics.summary(m) == dict(expert_load_max_over_mean=1.5, dropped_fraction=0.1)


def test_rerun_of_a_finished_run_takes_the_logged_values():
    logged = {"moe/load_max_over_mean": 1.3, "moe/dropped_fraction": 0.05}
    out = moe_metrics.summary(None, lambda k: logged.get(k, float("nan")))
    assert out == dict(expert_load_max_over_mean=1.3, dropped_fraction=0.05)


def test_dense_run_has_no_moe_fields():
    assert moe_metrics.summary({"loss": 1.0}) == {}
    assert moe_metrics.summary(None, lambda k: float("nan")) == {}

"""The notebooks in notebooks/ run top to bottom (nbclient, a fresh python3 kernel) and draw
plots. Like papermill, a cell with even smaller parameters is injected after each
notebook's `parameters` cell; the kernel gets one CPU device (not conftest's 8).
Each committed NAME.ipynb is exactly what notebooks/build.py writes from NAME.py, and all
notebooks share their first code cell (the set-up).
"""
import importlib.util
import os
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")

SMALL_MODEL = {"model.emb_dim": 32, "model.num_heads": 2, "model.mlp_dim": 64,
               "model.num_layers": 2, "batch_size": 8, "data.eval_examples": 16,
               "peak_tflops_per_device": 1.0}  # a fixed peak: skips the matmul measurement
PARAMETERS = {
    "quickstart.ipynb": dict(STEPS=4, LOG_EVERY=2, NUM_IMAGES=4, OVERRIDES=SMALL_MODEL),
    "moe_routing.ipynb": dict(STEPS=4, LOG_EVERY=2, EVAL_BATCHES=1, OVERRIDES=SMALL_MODEL),
    "pseudo_to_real.ipynb": dict(STEPS=6, LOG_EVERY=2, SWITCH_STEPS=[3], OVERRIDES=SMALL_MODEL),
    "text_to_image.ipynb": dict(VQ_STEPS=20, T2I_STEPS=4, SAMPLES_PER_DIGIT=2,
                                OVERRIDES=SMALL_MODEL),
}


def load_build():
    """notebooks/build.py as a module (notebooks/ is no package); needs jupytext."""
    pytest.importorskip("jupytext")
    spec = importlib.util.spec_from_file_location("notebooks_build",
                                                  os.path.join(NOTEBOOKS, "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_ipynb_is_built_from_its_percent_source():
    """A .py edited without `python notebooks/build.py` (or an .ipynb edited by hand) fails."""
    build = load_build()
    paths = build.sources()
    assert sorted(os.path.basename(build.ipynb_path(p)) for p in paths) == sorted(PARAMETERS)
    stale = []
    for path in paths:
        with open(build.ipynb_path(path), encoding="utf-8") as f:
            if f.read() != build.render(path):
                stale.append(os.path.basename(build.ipynb_path(path)))
    assert not stale, f"{stale} differ from their .py: run python notebooks/build.py"


def test_notebooks_share_the_setup_cell():
    firsts = {}
    for name in PARAMETERS:
        nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        firsts[name] = next(c.source for c in nb.cells if c.cell_type == "code")
    assert len(set(firsts.values())) == 1, "the first code cells differ: " + ", ".join(
        f"{n}: {s.splitlines()[:2]}" for n, s in firsts.items())
    assert "sys.path.insert(0, ROOT)" in firsts["quickstart.ipynb"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """One tokenizer.model for all notebooks: the first run trains it."""
    return str(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


def kernel_env():
    env = dict(os.environ, M6JAX_ROOT=ROOT, JAX_PLATFORMS="cpu", MPLBACKEND="agg")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def inject_parameters(nb, values: dict):
    """A code cell assigning `values` after the cell tagged `parameters` (papermill's way)."""
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell.id = "injected-parameters"
    nb.cells.insert(index + 1, cell)


# The quickstart notebook runs in the default suite; moe_routing (~45 s) and
# pseudo_to_real (two trainings, each with its final eval and caption decoding) run with
# the slow tests, which keeps the default suite under 15 minutes.
CASES = ["quickstart.ipynb", pytest.param("moe_routing.ipynb", marks=pytest.mark.slow),
         pytest.param("pseudo_to_real.ipynb", marks=pytest.mark.slow),
         pytest.param("text_to_image.ipynb", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", CASES)
def test_notebook_runs_and_plots(name, tmp_path, tokenizer):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{name} is committed with outputs: run python notebooks/build.py"
    inject_parameters(nb, dict(PARAMETERS[name], TOKENIZER=tokenizer,
                               WORKDIR=str(tmp_path / "workdir")))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.time()
    client.execute(env=kernel_env())  # raises CellExecutionError naming the failing cell
    print(f"{name}: executed in {time.time() - t0:.0f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} drew no plot"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "backend: cpu" in text and "devices: [CpuDevice(id=0)]" in text, text[:500]

"""The docs' first-day commands run as written: the override examples of "Running
experiments" (docs/running-experiments.md) and the "Train on your own photos" recipe
(docs/data.md, on generated photos)."""
import json
import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

CAPTIONS = ["一只红色的圆", "一个蓝色的方块", "绿色的草地", "黄色的太阳"]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 180, 30), (230, 210, 30)]


def doc_commands(page: str, heading: str) -> list[str]:
    """The commands of the first ```bash block after `heading` in `page` (a path from the
    repository root), continuations joined."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def _run(command: str, cwd, cache):
    env = dict(os.environ, M6JAX_CACHE=str(cache), PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # a user's shell has none; a command may set its own
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _workdir(command: str) -> str:
    return re.search(r"--workdir=(\S+)", command).group(1)


@pytest.mark.slow
def test_the_override_examples_run_as_written(tmp_path, cache):
    commands = doc_commands("docs/running-experiments.md", "## Running experiments")
    assert len(commands) == 2
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    for command in commands:
        proc = _run(command, tmp_path, cache)
        assert "clamped to 5" in proc.stderr  # the 50-step run's warmup
        summary = json.loads((tmp_path / _workdir(command) / "summary.json").read_text())
        assert summary["total_steps"] == 50


def _photos(root):
    rng = np.random.default_rng(0)
    os.makedirs(root / "photos")
    with open(root / "captions.jsonl", "w", encoding="utf-8") as f:
        for i in range(80):
            k, w, h = i % 4, int(rng.integers(60, 200)), int(rng.integers(60, 200))
            a = np.full((h, w, 3), 255, np.uint8)
            a[h // 4:3 * h // 4, w // 4:3 * w // 4] = COLOURS[k]
            Image.fromarray(a).save(root / "photos" / f"{i + 1:04d}.jpg")
            f.write(json.dumps({"image": f"photos/{i + 1:04d}.jpg", "caption": CAPTIONS[k]},
                               ensure_ascii=False) + "\n")


@pytest.mark.slow
def test_the_own_photos_recipe_runs_as_written(tmp_path, cache):
    train, generate = doc_commands("docs/data.md", "### Train on your own photos")
    _photos(tmp_path)
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    proc = _run(train, tmp_path, cache)
    assert "images: RGB" in proc.stderr and "-> 3 channels, resized to 32x32" in proc.stderr
    assert "images lose colour" not in proc.stderr
    assert "caption accuracy n/a" in proc.stdout and "zh reference '" in proc.stdout
    summary = json.loads((tmp_path / _workdir(train) / "summary.json").read_text())
    assert summary["caption_accuracy"] is None and summary["caption_overlap_f1"] > 0.5
    proc = _run(generate, tmp_path, cache)
    assert proc.stdout.splitlines()[-1].split(": ", 1)[1] in CAPTIONS  # 0001 is a red circle
    assert Image.open(tmp_path / "seen.png").size == (34 * 8, 34 * 8)  # 32 px + border, 8x

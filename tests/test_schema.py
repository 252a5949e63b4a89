"""One config schema (m6jax/schema.py): library code reads fields directly, every config
family starts from it, and an older run's config is completed from it."""
import ast
import pathlib

import ml_collections
import pytest

from m6jax import schema
from m6jax.config_checks import validate_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Names the library gives a config or one of its sections.
CONFIG_NAMES = {"config", "cfg", "c", "model_cfg", "opt_cfg", "moe_cfg", "run_config"}


def _root(node):
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.value if not isinstance(node, ast.Call) else node.func
    return node.id if isinstance(node, ast.Name) else None


def _is_config(node, names) -> bool:
    if isinstance(node, ast.BoolOp):  # sec = config.get("pipeline") or {}
        return any(_is_config(v, names) for v in node.values)
    if isinstance(node, ast.Call):  # section(config): a section; read_meta(...): not one
        return isinstance(node.func, ast.Name) and node.func.id.endswith("section")
    chain = ast.unparse(node)
    return _root(node) in names or ".config" in chain or ".cfg" in chain


def _config_gets_with_default(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set(CONFIG_NAMES)  # + local aliases of a config or a section (m = config.model)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and _is_config(node.value, names)):
            names.add(node.targets[0].id)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get" and len(node.args) >= 2):
            if _is_config(node.func.value, names):
                yield f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"


def test_no_config_read_supplies_a_default():
    found = [hit for p in sorted((ROOT / "m6jax").rglob("*.py"))
             for hit in _config_gets_with_default(p)]
    assert not found, "read the field directly (defaults live in m6jax/schema.py):\n" + \
        "\n".join(found)


def test_every_field_has_a_default_and_a_meaning():
    tables = [schema.RUN, *schema.SECTIONS.values(), schema.MOE, schema.T2I, schema.HARDWARE]
    for table in tables:
        for name, entry in table.items():
            assert isinstance(entry, tuple) and len(entry) == 2, name
            assert isinstance(entry[1], str) and entry[1], name


def test_the_config_files_only_override_schema_fields():
    # m6.py:tiny is the schema's defaults plus overrides: no field outside the schema.
    from configs import m6, m6_10t, m6_moe
    for c in (m6.get_config("tiny"), m6_moe.get_config("tiny"), m6_10t.get_config("mini")):
        flat = _fields(c.to_dict())
        known = _fields(schema.defaults().to_dict()) | {
            f"model.moe.{k}" for k in schema.MOE} | {f"hardware.{k}" for k in schema.HARDWARE}
        assert flat <= known | {"model.moe"} | {f"data.task_weights.{t}" for t in
                                                ("caption", "caption_denoise", "denoise", "lm")}
        assert flat - {"model.moe", "hardware"} >= {k for k in _fields(
            schema.defaults().to_dict()) if not k.startswith("data.task_weights")}


def _fields(d, prefix=""):
    out = set()
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _fields(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


def test_an_older_config_is_completed_and_a_partial_one_refused():
    from configs import m6
    old = m6.get_config("tiny").to_dict()
    del old["model"]["attention"], old["optimizer"]["loss_scale"], old["pipeline"]
    c = ml_collections.ConfigDict(old)
    with pytest.raises(ValueError, match="pipeline .a section. is missing"):
        validate_config(c, 8)
    done = schema.complete(c)
    assert done.model.attention == "dense" and done.optimizer.loss_scale == "auto"
    assert done.pipeline.microbatches == 1 and done.model.emb_dim == 128
    validate_config(done, 8)

"""Builds each notebook NAME.ipynb (outputs stripped) from its jupytext percent source NAME.py
in this folder: edit the .py, then run

    python notebooks/build.py                 # every notebook
    python notebooks/build.py quickstart      # some (names or paths of their .py)
    python notebooks/build.py --check         # exit 1 if a committed .ipynb is stale
    python notebooks/build.py --execute DIR   # also run each (fresh kernel), executed copy in DIR

The conversion is jupytext's (`# %%` a code cell, `# %% [markdown]` a markdown cell,
`tags=["parameters"]` after the marker a tag, commented magics such as `# %matplotlib
inline` live again). Only the notebook around the cells is fixed here, so that a build
is byte-for-byte reproducible: the same notebook metadata for all (kernel, Colab), cell
metadata reduced to `tags` (jupytext's own layout keys such as `lines_to_next_cell` are
dropped), cell ids NAME-0, NAME-1, ... Every notebook starts with the same set-up code
cell (Colab clone and install, or the local clone's path); tests/test_notebooks.py checks
that, and that each .ipynb is what this script writes from its .py.
"""
import argparse
import glob
import os
import sys

import jupytext
import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
METADATA = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}, "colab": {"provenance": []}}


def sources():
    """Paths of the percent sources here: each NAME.py whose first line is a `# %%` marker."""
    def is_percent(path):
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith("# %%")
    return sorted(p for p in glob.glob(os.path.join(HERE, "*.py")) if is_percent(p))


def notebook(path):
    """The notebook (nbformat 4.5, no outputs) that jupytext reads from the percent file."""
    name = os.path.splitext(os.path.basename(path))[0]
    nb = jupytext.read(path, fmt="py:percent")
    nb.metadata = nbformat.from_dict(METADATA)
    for i, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags")
        cell.metadata = nbformat.from_dict({"tags": list(tags)} if tags else {})
        cell.id = f"{name}-{i}"  # stable ids: a rebuild of an unchanged .py changes nothing
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.validate(nb)
    return nb


def render(path):
    """NAME.ipynb's text, as written (nbformat's JSON, one trailing newline)."""
    text = nbformat.writes(notebook(path))
    return text if text.endswith("\n") else text + "\n"


def ipynb_path(path):
    return os.path.splitext(path)[0] + ".ipynb"


def execute(path, out_dir):
    """Runs the built notebook top to bottom from this folder; writes the executed copy."""
    import nbclient
    nb = notebook(path)
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": HERE}}).execute()
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, os.path.basename(ipynb_path(path)))
    nbformat.write(nb, out)
    return out


def resolve(names):
    if not names:
        return sources()
    paths = []
    for n in names:
        p = n if n.endswith(".py") else os.path.join(HERE, os.path.splitext(n)[0] + ".py")
        if not os.path.isfile(p):
            sys.exit(f"no percent source {p}")
        paths.append(os.path.abspath(p))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks (NAME or NAME.py); default: all")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a .ipynb differs from its build")
    parser.add_argument("--execute", metavar="DIR",
                        help="after building, run each notebook and write the executed copy to DIR")
    args = parser.parse_args(argv)
    stale = []
    for path in resolve(args.names):
        target, text = ipynb_path(path), render(path)
        old = open(target, encoding="utf-8").read() if os.path.exists(target) else None
        if args.check:
            if old != text:
                stale.append(target)
        elif old != text:
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)
            print("wrote", os.path.relpath(target))
        else:
            print("unchanged", os.path.relpath(target))
        if args.execute:
            print("executed", os.path.relpath(execute(path, args.execute)))
    if stale:
        print("stale (run python notebooks/build.py):", *map(os.path.relpath, stale), sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

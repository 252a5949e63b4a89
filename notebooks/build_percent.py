"""Writes NAME.ipynb (outputs cleared) from each percent-format source NAME.py given:

    python notebooks/build_percent.py notebooks/text_to_image.py

`# %%` starts a code cell (`tags=["parameters"]` after it tags the cell), `# %% [markdown]`
a markdown cell whose lines drop their leading "# "; a commented magic ("# %matplotlib
inline") is uncommented. The same format jupytext reads, so
`jupytext --sync` also works where jupytext is installed; this keeps the suite free of it.
"""
import ast
import re
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

_HEADER = re.compile(r"^# %%(?P<md> \[markdown\])?(?P<meta>.*)$")


def cells(source: str):
    out, kind, meta, lines = [], None, "", []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind == "md":
            out.append(new_markdown_cell("\n".join(l[2:] if l.startswith("# ") else l.lstrip("#")
                                                   for l in text.splitlines())))
        elif kind == "code" and text:
            # jupytext comments out magics in the .py; they are live in the notebook
            cell = new_code_cell(re.sub(r"^# (%\w+)", r"\1", text, flags=re.M))
            m = re.search(r"tags=(\[.*?\])", meta)
            if m:
                cell.metadata["tags"] = ast.literal_eval(m.group(1))
            out.append(cell)

    for line in source.splitlines():
        m = _HEADER.match(line)
        if m:
            flush()
            kind, meta, lines = ("md" if m.group("md") else "code"), m.group("meta"), []
        else:
            lines.append(line)
    flush()
    return out


def main(paths):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            nb = new_notebook(cells=cells(f.read()))
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, path[:-3] + ".ipynb")
        print("wrote", path[:-3] + ".ipynb")


if __name__ == "__main__":
    main(sys.argv[1:])

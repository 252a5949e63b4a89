"""What every entry point does with bad input: one line on stderr, exit status 2.

No JAX here: flag and workdir problems are refused before anything heavy is imported.
`parse_flags` is the `flags_parser` of `absl.app.run`; absl itself would print a
traceback for a config-file override that names no field or a config file that fails to
load, and exits 1 for a bad flag value.
"""
from __future__ import annotations

import logging
import os
import re
import sys

EXIT_BAD_INPUT = 2
# Our code: the package and the entry points. INFO lines from anywhere else (Orbax's ~40
# per checkpoint, JAX's backend probe) are dropped unless --verbosity is given.
_OWN_CODE = (os.path.dirname(os.path.realpath(__file__)),
             os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))),
                          "experiments"))


def refuse(message: str):
    """Prints `message` (one line) to stderr and exits with EXIT_BAD_INPUT."""
    print(" ".join(str(message).split()), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD_INPUT)


def define_config(name: str, default: str | None, help_text: str):
    """`config_flags.DEFINE_config_file`, with a bad `--config*` flag refused in one line.

    ml_collections reads the `--config.field=value` overrides from sys.argv when the
    flag is defined (at import of the entry point), so an override naming no field fails
    here, not in absl's parsing.
    """
    from ml_collections import config_flags
    _check_config_file(sys.argv)
    try:
        return config_flags.DEFINE_config_file(name, default, help_text, lock_config=True)
    except AttributeError as e:  # an override naming no field of the config
        _refuse_unknown_field(e, sys.argv)


def _check_config_file(argv):
    for arg in argv[1:]:  # a missing config file: ml_collections' message is unhelpful
        m = re.match(r"--config=([^:]+\.py)(:.*)?$", arg)
        if m and not os.path.isfile(m.group(1)):
            refuse(f"flag error: --config={m.group(1)}: no such config file; give a path such "
                   "as experiments/configs/m6.py:tiny")


def _refuse_unknown_field(e: Exception, argv):
    text = str(e).encode().decode("unicode_escape") if "\\" in str(e) else str(e)
    key = re.findall(r"'([^'\n]+)'", text)
    key = key[0] if key else text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    arg = next((a.split("=")[0] for a in argv if a.startswith("--config.") and
                re.search(rf"[.]{re.escape(key)}$", a.split("=")[0])), f"--config.*.{key}")
    refuse(f"flag error: {arg}: {key!r} is not a field of this config"
           + (f"; did you mean {hint.group(1)!r}?" if hint else "; see the config file"))


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing (`app.run(main, flags_parser=parse_flags)`) with every failure
    reported as one `flag error: ...` line."""
    from absl import flags
    _check_config_file(argv)
    try:
        rest = flags.FLAGS(argv)
        if not verbose():
            quiet_logs()
        return rest
    except AttributeError as e:
        _refuse_unknown_field(e, argv)
    except Exception as e:  # noqa: BLE001 (flags.Error, a config file's own ValueError, ...)
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        raised = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", l)]
        if raised:
            message = raised[-1].split(": ", 1)[1]
        elif lines:
            message = lines[-1]
        else:
            message = type(e).__name__
        refuse(f"flag error: {message}")


def check_workdir(path: str, flag: str = "--workdir") -> str:
    """The absolute path of a directory to write into; refuses a file, a path under a
    file, or one that cannot be created or written. Creates nothing (the run does)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        refuse(f"flag error: {flag}={path} is a file, not a directory; give a directory "
               "(it is created if missing)")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        refuse(f"flag error: {flag}={path} cannot be created: {parent} is a file; give a "
               "directory path")
    if not os.access(parent, os.W_OK | os.X_OK):
        refuse(f"flag error: {flag}={path}: {parent} is not writable; give a writable "
               "directory")
    return path


def verbose() -> bool:
    """True when the user set --verbosity (or -v): then every library's lines are shown."""
    from absl import flags
    return "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present


class _OwnInfo(logging.Filter):
    def filter(self, record):
        return (record.levelno >= logging.WARNING
                or os.path.realpath(record.pathname).startswith(_OWN_CODE))


class _Short(logging.Formatter):
    def format(self, record):
        prefix = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
        return f"{self.formatTime(record, '%H:%M:%S')} {prefix}{record.getMessage()}"


def quiet_logs():
    """One short line per log call of ours; other libraries' INFO lines dropped."""
    from absl import logging as absl_logging
    handler = absl_logging.get_absl_handler()
    handler.addFilter(_OwnInfo())
    handler.setFormatter(_Short())


def config_line(argv) -> str:
    """`config: FILE:VARIANT with a=1, b=2`: the command's config in one line."""
    config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "default")
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    return f"config: {config}" + (f" with {', '.join(overrides)}" if overrides else "")

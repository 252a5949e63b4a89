"""What every benchmark does with --json=PATH: its result written there, folder made."""
import json
import os


def write_json(path: str, result, indent: int = 1) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=indent)

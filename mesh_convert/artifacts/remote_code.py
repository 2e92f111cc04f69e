"""Our two model files are the only remote code in anything mesh-convert writes or publishes.

A checkpoint or tokenizer that we copy from may name code of its own: an `auto_map` in one of its
JSON files (config.json, tokenizer_config.json, a processor's config), which transformers resolves
to a `.py` file beside it or in another Hub repo (`org/repo--module.Class`), or `custom_pipelines`
in config.json. On its own such a source loads with transformers' built-in classes and runs
nothing; but our model cards tell users to load with `trust_remote_code=True`, which would then run
that code too. So every such reference that is not to our two files is dropped, and every `.py`
file but those two left out, from each folder we write and from what `push` publishes; the
writers report what was dropped. Light to import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import shown

REMOTE_CODE_FILES = ("configuration_mesh.py", "modeling_mesh.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mesh.MeshConfig",
    "AutoModel": "modeling_mesh.MeshModel",
    "AutoModelForCausalLM": "modeling_mesh.MeshForCausalLM",
}
# Top-level keys of a JSON file through which transformers finds code to run.
CODE_KEYS = ("auto_map", "custom_pipelines")
BRIEF_CHARACTERS = 120  # of one dropped reference in the report


def may_name_code(relative: str) -> bool:
    """Whether the file at `relative` (a POSIX path inside a model folder) is code, or a JSON file
    at the top of the folder, where transformers looks for `auto_map`."""
    return relative.endswith(".py") or ("/" not in relative and relative.endswith(".json"))


def without_foreign_code(relative: str, content: bytes) -> tuple[bytes | None, list[str]]:
    """A file of a model folder as we may write it: None where it is code other than our two
    files (or an unreadable JSON file that mentions code keys), else `content` with every code
    reference not ours dropped; with one description of each thing dropped."""
    if relative.endswith(".py"):
        return (content, []) if relative in REMOTE_CODE_FILES else (None, [relative])
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        # A file that we cannot read and that names code could still be read by another parser:
        # leave it out rather than vouch for it.
        mentions = any(key.encode() in content for key in CODE_KEYS)
        return (None, [f"{relative} (unreadable, names {' or '.join(CODE_KEYS)})"]) if mentions else (content, [])
    if not isinstance(data, dict) or not any(key in data for key in CODE_KEYS):
        return content, []
    dropped = []
    kept = {key: value for key, value in data.items() if key not in CODE_KEYS}
    auto_map = data.get("auto_map")
    if isinstance(auto_map, dict):
        ours = {key: value for key, value in auto_map.items() if relative == "config.json" and AUTO_MAP.get(key) == value}
        dropped += [f"{relative} auto_map {key}: {_brief(value)}" for key, value in auto_map.items() if key not in ours]
        if ours:
            kept["auto_map"] = ours
    elif "auto_map" in data:
        dropped.append(f"{relative} auto_map: {_brief(auto_map)}")
    if "custom_pipelines" in data:
        dropped.append(f"{relative} custom_pipelines: {_brief(data['custom_pipelines'])}")
    if not dropped:
        return content, []
    return (json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode(), dropped


def _brief(value) -> str:
    """A dropped reference as JSON, cut to a length that a one-line report can hold."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= BRIEF_CHARACTERS else text[: BRIEF_CHARACTERS - 1] + "…"


def strip_foreign_code(directory: str | Path) -> list[str]:
    """Drop from the folder we are writing, in place, every code reference and `.py` file that is
    not ours (see the module's docstring); what was dropped, one description each."""
    directory = Path(directory)
    dropped = []
    for folder, subfolders, files in os.walk(directory):
        subfolders.sort()
        for name in sorted(files):
            path = Path(folder, name)
            relative = path.relative_to(directory).as_posix()
            if not may_name_code(relative):
                continue
            content = path.read_bytes()
            cleaned, found = without_foreign_code(relative, content)
            if cleaned is None:
                path.unlink()
            elif cleaned != content:
                path.write_bytes(cleaned)
            dropped += found
    return dropped


def warn_removed(console, removed: list[str]) -> None:
    """The one warning line (on a rich `console`) that says what was dropped, if anything was."""
    if removed:
        line = f"removed remote code that is not mesh-convert's: {'; '.join(removed)}"
        console.print(f"[bold yellow]warning:[/] {shown(line)}", highlight=False, soft_wrap=True)

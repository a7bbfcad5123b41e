"""Reading an export's manifest.json: the one contract every later stage reads (and nothing else)."""

from __future__ import annotations

import json
from pathlib import Path

from qwen3next_trt.errors import InputError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "qwen3next-trt/manifest"


def read_manifest(onnx_dir: str | Path) -> dict:
    path = Path(onnx_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: not found: expected the output directory of `qwen3next-trt export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise InputError(f"{path}: field 'format': expected {MANIFEST_FORMAT!r}, got {got!r}")
    return manifest


def is_export(path: str | Path) -> bool:
    """Whether `path` holds an export written by this tool: its manifest's `format` says so (a
    folder that merely has some manifest.json is not ours to replace)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False

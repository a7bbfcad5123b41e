"""Content hashes of the files the stages hand each other (weights, engines, calibration data)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 16 MiB blocks so an 80B layer's weights never sit in memory whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


# A file's identity as the filesystem reports it: any write, replacement (rename, copy, `cp -p`) or
# metadata change gives another ctime or inode, so a recorded hash is reused only for the very same
# bytes. This is what makes verifying an 80 GB export cost seconds after its first read.
HASH_CACHE_ENV = "QWEN3NEXT_TRT_HASH_CACHE"  # a file path, or "off" to hash every time
CACHE_ENTRIES = 4096  # past this many, entries of files that no longer exist are dropped


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _cache_path() -> Path | None:
    import os

    env = os.environ.get(HASH_CACHE_ENV)
    if env == "off":
        return None
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwen3next-trt" / "sha256.json"


def _load_cache(path: Path | None) -> dict:
    import json

    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def verified_sha256(path: str | Path) -> tuple[str, bool]:
    """(sha256, whether it was computed now): from the cache when the file's identity (size, mtime,
    ctime, inode, device) is the one recorded with the hash, else hashed and recorded."""
    import json
    import os

    path = Path(path).resolve()
    ident = _identity(path)
    cache_file = _cache_path()
    cache = _load_cache(cache_file)
    hit = cache.get(str(path))
    if isinstance(hit, dict) and hit.get("identity") == ident and isinstance(hit.get("sha256"), str):
        return hit["sha256"], False
    digest = file_sha256(path)
    if _identity(path) != ident:  # written while we read it: do not record
        return digest, True
    if cache_file is not None:
        cache = _load_cache(cache_file)  # another process may have added entries meanwhile
        cache[str(path)] = {"identity": ident, "sha256": digest}
        if len(cache) > CACHE_ENTRIES:  # forget files that are gone (deleted exports, test folders)
            cache = {k: v for k, v in cache.items() if Path(k).exists()}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home: hashes are simply computed again next time
    return digest, True

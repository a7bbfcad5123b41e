"""Output folders of export, build and deploy: what may be written, replaced or deleted.

One rule for every command that writes a folder, because replacing a folder means deleting it:
- an output that is, contains, or is inside one of the command's inputs is refused (replacing it
  would delete the input, or the input would be rewritten under the command reading it);
- an existing non-empty folder is replaced only when it carries the mark of the command that wrote
  it (an export's manifest, an engines folder's marker or engine metadata, a repository's marker);
  `--force` never widens that, since a mistyped path would otherwise lose someone's files;
- one writer per output at a time: a lock file beside it holds the writer's pid under `flock`, so a
  writer that died (even by SIGKILL) holds nothing and the next one simply takes the lock over;
- temporary folders beside the output carry the writer's pid, so a later writer can tell the ones
  left by a killed run from those of a run still going, and removes only the former.
All checks run before anything is created or deleted.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

from qwen3next_trt.errors import InputError

PARTIAL = "partial"


def check_output(out: str | Path, flag: str, inputs: Mapping[str, str | Path | None], written_here: Callable[[Path], bool],
                 what: str, mark: str) -> Path:
    """The resolved output path, or InputError `<flag> <out>: ...` if writing there could destroy an
    input or a folder this tool did not write. `inputs`: description -> path (None: not given);
    `written_here(path)` recognises a folder this command wrote; `what` / `mark` name it in errors."""
    given = Path(out)
    out = refuse_overlap(given, flag, inputs, what)
    if out.is_dir() and any(out.iterdir()) and not written_here(out):
        raise InputError(f"{flag} {given}: exists, is not empty and is not {what} (no {mark}); refusing to replace it, "
                         "with or without --force: choose a new or empty folder")
    return out


def refuse_overlap(out: str | Path, flag: str, inputs: Mapping[str, str | Path | None], what: str = "output") -> Path:
    """The resolved output folder `out`, or InputError if it is a file, sits under a file, or is, contains
    or is inside one of `inputs`. An input that does not exist yet counts too: a calibration file the
    export is about to create inside `out` would be deleted with the old `out`."""
    given = Path(out)
    out = given.resolve()
    check_parents(given, flag)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {given}: exists and is not a folder: expected a new, empty or earlier {what} folder")
    for label, path in inputs.items():
        if path is None:
            continue
        src = Path(path).resolve()
        if out == src or (out.exists() and src.exists() and os.path.samefile(out, src)):
            relation = "is"
        elif out in src.parents:
            relation = "contains"
        elif src in out.parents:
            relation = "is inside"
        else:
            continue
        raise InputError(f"{flag} {given}: {relation} the input {label} {src}: expected a folder outside it "
                         "(writing there would overwrite or delete the input)")
    return out


def check_parents(path: Path, flag: str) -> None:
    """InputError when an existing ancestor of `path` is not a folder (nothing could be made under it)."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{flag} {path}: {parent} is a file, not a folder: expected a path in a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"{flag} {path}: {parent} is not writable")
            return


def output_file(flag: str):
    """An argparse type for a file this command writes (--json, --times): not a folder, in a folder."""
    import argparse

    def parse(text: str) -> Path:
        path = Path(text)
        if not text or path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder (or empty): expected a file path to write")
        try:
            check_parents(path, flag)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag} ")) from None
        return path
    return parse


def write_file(path: str | Path, text: str) -> Path:
    """Write a whole file or nothing: a temporary file beside it, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextmanager
def exclusive(out: Path, flag: str) -> Iterator[None]:
    """Hold the output's lock for the block; InputError `<flag> <out>: in use by process N` if a live
    process holds it. The parent folder must exist."""
    lock = _lock_path(out)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(f"{flag} {out}: in use by process {holder} (lock {lock}); wait for it to finish") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        # the holder released (unlinked) the file between our open and flock: lock the new one instead
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        # unlink before close: a waiter that locks the old inode afterwards notices it is gone
        lock.unlink(missing_ok=True)
        os.close(fd)


def partial_dir(out: Path) -> Path:
    """A new hidden folder beside `out` to write into before renaming it into place."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{PARTIAL}-{os.getpid()}-", dir=out.parent))


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the temporary folders of `out` whose writer is gone (killed before it could clean up)."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.{PARTIAL}-(\d+)-")
    for p in out.parent.glob(f".{glob.escape(out.name)}.{PARTIAL}-*"):
        m = pattern.match(p.name)
        if m and p.is_dir() and (int(m.group(1)) == os.getpid() or not _alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing an earlier `out` only after the new one is complete."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = partial_dir(out)
    # a signal between the two renames would leave no `out` at all: hold SIGINT/SIGTERM until both are done
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        os.replace(out, old / "old")
        os.replace(tmp, out)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        # interrupted while deleting the old one: the CLI ignores further signals, so this finishes
        shutil.rmtree(old, ignore_errors=True)
        raise


@contextmanager
def staged(out: Path, flag: str = "--out") -> Iterator[Path]:
    """A temporary folder beside `out` to write into, swapped in for `out` when the block ends without an
    error, removed when it does not: one writer at a time (exclusive), and what an earlier killed run
    left beside `out` cleared first."""
    with exclusive(out, flag):
        remove_stale_partials(out)  # a run killed before it could clean up (SIGKILL, power loss)
        work = partial_dir(out)
        try:
            yield work
            replace_dir(work, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

"""Integrity of what the trainer writes and reads back: nothing corrupt is trained on, nothing
non-finite is written, and every failure names its file.

Every file the trainer writes and later reads carries a sha256, checked on every load; a
mismatch raises :class:`CorruptFileError` naming the file. Where the checksum lives depends on
the kind of file:

* a **directory artifact** (the fixed data, a saved policy, an exported model): its files plus
  ``manifest.json``, written last (:func:`write_manifest`), listing each file's sha256 and size;
  :func:`read_manifest` verifies the lot. A crash while writing leaves no manifest, so the
  directory reads as incomplete, never as valid.
* a **checkpoint** (one ``torch.save`` file, replaced in place): a 40-byte trailer,
  ``TRAILER_MAGIC`` + the sha256 of the bytes before it (:func:`save_torch` /
  :func:`load_torch`). ``torch.load`` reads such a file as it is (zip readers find the archive
  from its end record, and tolerate trailing bytes; ``tests/train/test_integrity.py`` checks it).
* a small **JSON** file read back (a manifest, ``base_eval.json``, ``config.json``): a top-level
  ``"sha256"`` key holding the digest of the rest of the object, in canonical form
  (:func:`write_json` / :func:`read_json`).

Every write goes to ``<name>.tmp``, is flushed and fsynced, then renamed over the old file, so a
crash (or a full disk) mid-write leaves the previous version intact; a full disk raises
:class:`DiskFullError` ("no space left on device", naming the file) instead of whatever the
serializer makes of a short write. ``metrics.jsonl``, an append-only log, is not checksummed;
:func:`read_jsonl` drops a torn last line (what a crash or a full disk leaves) and names the
file and line of any other bad one. :func:`check_finite` and :func:`check_step` refuse
non-finite weights and steps by name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

MANIFEST = "manifest.json"
TRAILER_MAGIC = b"ERPDSHA1"  # + 32 bytes of sha256
_TRAILER = len(TRAILER_MAGIC) + 32
_CHECKSUM_KEY = "sha256"


class IntegrityError(RuntimeError):
    """Corrupt or non-finite state that the trainer refuses to use or write."""


class CorruptFileError(IntegrityError):
    """A file that fails its checksum, is truncated, or cannot be parsed; the message names it."""


class DiskFullError(IntegrityError):
    """No space left while writing a file; the previous version of the file is intact."""


class NonFiniteError(IntegrityError):
    """NaN or inf in weights, a loss or a gradient norm."""


# ---------------------------------------------------------------------------------------------
# writing


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it: torch.save wraps the OSError of a failed write) is a full disk."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def disk_errors(path: Path, state: str = "the previous version of the file (if any) is intact"):
    """Turns a full disk while writing `path` into :class:`DiskFullError` naming it; `state` says
    what the failed write left."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if _disk_full(e):
            raise DiskFullError(f"{path}: no space left on device while writing it; {state}. Free some space and "
                                "run again (with --resume to continue)") from e
        raise


class _HashingWriter:
    """A write-only binary file that hashes what goes through it."""

    def __init__(self, f):
        self._f, self._h, self.bytes = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self._h.update(b)
        self.bytes += len(b)
        return self._f.write(b)

    def write_unhashed(self, b) -> int:
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()

    def digest(self) -> bytes:
        return self._h.digest()


def atomic_write(path: str | os.PathLike, write: Callable[[_HashingWriter], None]) -> dict:
    """Write `path` through ``write(f)`` into ``<path>.tmp``, fsync it, and rename it over `path`.

    Returns ``{"sha256", "bytes"}`` of what ``write`` wrote through ``f.write`` (not of a trailer
    written with ``f.write_unhashed``). A crash or a full disk leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with disk_errors(path):
            with open(tmp, "wb") as raw:
                f = _HashingWriter(raw)
                write(f)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return {"sha256": f.digest().hex(), "bytes": f.bytes}


def write_bytes(path: str | os.PathLike, data: bytes) -> dict:
    return atomic_write(path, lambda f: f.write(data))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# single files: torch.save with a trailer, JSON with an embedded checksum


def save_torch(path: str | os.PathLike, obj) -> None:
    """``torch.save(obj)`` to `path`, atomically, followed by the sha256 trailer."""

    def write(f: _HashingWriter) -> None:
        torch.save(obj, f)
        f.write_unhashed(TRAILER_MAGIC + f.digest())

    atomic_write(path, write)


def load_torch(path: str | os.PathLike):
    """``torch.load`` of a :func:`save_torch` file after checking its trailer."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size >= _TRAILER:
            f.seek(size - _TRAILER)
            trailer = f.read(_TRAILER)
        if size < _TRAILER or not trailer.startswith(TRAILER_MAGIC):
            raise CorruptFileError(f"{path}: no erpd checksum at its end (the file is truncated, or was not "
                                   "written by this version of erpd)")
        f.seek(0)
        h, left = hashlib.sha256(), size - _TRAILER
        while left:
            chunk = f.read(min(left, 1 << 20))
            h.update(chunk)
            left -= len(chunk)
    if h.digest() != trailer[len(TRAILER_MAGIC):]:
        raise CorruptFileError(f"{path}: sha256 does not match the checksum it was written with (the file was "
                               "modified or corrupted)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # checksum-valid but unreadable: written by a broken or foreign tool
        raise CorruptFileError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_json(path: str | os.PathLike, obj: dict) -> dict:
    """`obj` (a dict, without a ``"sha256"`` key) as indented JSON with its checksum, atomically."""
    if _CHECKSUM_KEY in obj:
        raise ValueError(f"{path}: the key {_CHECKSUM_KEY!r} is reserved for the checksum")
    obj = json.loads(json.dumps(obj, default=str))  # what reading it back gives
    body = {**obj, _CHECKSUM_KEY: hashlib.sha256(_canonical(obj)).hexdigest()}
    return write_bytes(path, (json.dumps(body, indent=1) + "\n").encode())


def parse_json(path: str | os.PathLike, text: str, hint: str = "; the file is truncated or was edited"):
    """``json.loads`` whose error names the file, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}){hint}") from e


def read_json(path: str | os.PathLike) -> dict:
    """A :func:`write_json` file, checked; returns the object without its checksum."""
    path = Path(path)
    obj = parse_json(path, path.read_text())
    if not isinstance(obj, dict) or _CHECKSUM_KEY not in obj:
        raise CorruptFileError(f"{path}: no {_CHECKSUM_KEY!r} checksum (not written by this version of erpd, or edited)")
    return verify_json(path, obj)


def verify_json(path: str | os.PathLike, obj: dict, hint: str = "") -> dict:
    """Pop and check the checksum of a parsed :func:`write_json` object; returns the object."""
    want = obj.pop(_CHECKSUM_KEY)
    if hashlib.sha256(_canonical(obj)).hexdigest() != want:
        raise CorruptFileError(f"{path}: its content does not match its sha256 checksum (the file was modified or "
                               f"corrupted){hint}")
    return obj


# ---------------------------------------------------------------------------------------------
# directory artifacts


def write_manifest(directory: str | os.PathLike, files: Mapping[str, dict] | Iterable[str], fmt: str, version: int,
                   **fields) -> Path:
    """Write ``directory/manifest.json`` (last: it is the commit point) for `files`.

    `files` maps each file name (relative to `directory`) to the ``{"sha256", "bytes"}`` that
    :func:`atomic_write` returned, or is a list of names to hash now. ``fields`` are stored
    alongside (JSON-serializable). Call :func:`begin_directory` before writing the files.
    """
    d = Path(directory)
    if not isinstance(files, Mapping):
        files = {name: {"sha256": sha256_file(d / name), "bytes": (d / name).stat().st_size} for name in files}
    write_json(d / MANIFEST, {"format": fmt, "version": version, "files": dict(files), **fields})
    return d / MANIFEST


def begin_directory(directory: str | os.PathLike) -> Path:
    """Create `directory` and remove its manifest: until the new one is written, the directory
    reads as incomplete (a crash while rewriting it never leaves a mix that looks valid)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / MANIFEST).unlink(missing_ok=True)
    return d


def read_manifest(directory: str | os.PathLike, fmt: str, version: int, remedy: str,
                  error: type[CorruptFileError] = CorruptFileError) -> dict:
    """Check ``directory/manifest.json`` and every file it lists (size, then sha256); returns the
    manifest (without its checksum). Each failure raises `error` naming the file; `remedy` (e.g.
    "re-run `erpd sample`") ends the message of a missing or unreadable manifest."""
    d = Path(directory)
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise error(f"{d}: no {MANIFEST} (not an erpd {fmt} directory, written by an erpd without checksums, or "
                    f"its writing was interrupted); {remedy}")
    try:
        manifest = parse_json(mpath, mpath.read_text())
    except CorruptFileError as e:
        raise error(f"{e}; {remedy}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise error(f"{mpath}: format {got!r}, expected {fmt!r}")
    if manifest.get("version") != version:
        raise error(f"{mpath}: format version {manifest.get('version')!r}; this erpd reads version {version}; {remedy}")
    if _CHECKSUM_KEY not in manifest:
        raise error(f"{mpath}: no {_CHECKSUM_KEY!r} checksum of its own (edited?); {remedy}")
    try:
        manifest = verify_json(mpath, manifest)
    except CorruptFileError as e:
        raise error(str(e)) from e
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise error(f"{mpath}: lists no files")
    for name, entry in files.items():
        path = d / name
        if not path.is_file():
            raise error(f"{path}: missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise error(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
        if sha256_file(path) != entry["sha256"]:
            raise error(f"{path}: sha256 does not match the manifest (the file was modified or corrupted)")
    return manifest


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` whose errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CorruptFileError(f"{path}: unreadable safetensors file ({e}); the file is truncated or corrupted") from e


# ---------------------------------------------------------------------------------------------
# JSONL logs


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file. A last line without its newline that does not parse is a
    torn write (a crash or a full disk mid-append): dropped, with a note on stderr. Any other bad
    line raises :class:`CorruptFileError` naming the file and line."""
    path = Path(path)
    text = path.read_text()
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline
    records = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CorruptFileError(f"{path}:{i}: not valid JSON ({e.msg}); the file was corrupted or edited") from e
    if torn.strip():
        try:
            records.append(json.loads(torn))
        except json.JSONDecodeError:
            print(f"[erpd] {path}:{len(lines) + 1}: dropped a torn last line (an interrupted write)", file=sys.stderr)
    return records


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line; a full disk raises :class:`DiskFullError` naming the file (the line may
    be torn, which :func:`read_jsonl` tolerates)."""
    with disk_errors(Path(path), "its last line may be torn, which --resume drops"), open(path, "a") as f:
        f.write(line + "\n")


# ---------------------------------------------------------------------------------------------
# finite values


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`NonFiniteError` naming `where` and the first tensor holding NaN or inf."""
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"{where}: {name} has {n} non-finite value(s) (NaN or inf) among {t.numel()}; "
                                 "refusing to use it")


def check_step(stage: str, step: int, loss: float, grad_norm: float, last_checkpoint: Path) -> None:
    """Stop a run whose optimizer step has a non-finite loss or gradient norm, before the step
    changes a weight or writes a record."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    raise NonFiniteError(
        f"{stage} step {step}: loss {loss}, gradient norm {grad_norm}; stopped before the optimizer step, so no "
        f"weight, metric or checkpoint of this step was written ({last_checkpoint}, if present, holds the last good "
        "state). Lower the learning rate, or check the data and the teacher"
    )

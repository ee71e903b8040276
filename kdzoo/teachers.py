"""The published CIFAR-100 teacher checkpoints: registry, verified download, safe extraction, ``teachers:NAME``.

RepDistiller publishes one file per teacher (HobbitLong/RepDistiller scripts/fetch_pretrained_teachers.sh);
mdistiller publishes one tar of teachers (megvii-research/mdistiller README, release ``checkpoints``). Neither
publishes a checksum, so the SHA-256 of the first download is recorded in ``manifest.json`` in the teachers
directory and every later use is checked against it (docs/teachers.md).
"""

from __future__ import annotations

import difflib
import http.client
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm.auto import tqdm

from kdzoo.digest import file_sha256
from kdzoo.errors import UserInputError

PREFIX = "teachers:"  # `teacher.checkpoint: teachers:resnet32x4` in a recipe
ENV_DIR = "KDZOO_TEACHERS"
DEFAULT_DIR = "teachers"  # under the working directory
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "kdzoo-teachers"
TIMEOUT_S = 60.0
CHUNK = 1 << 16
ATTEMPTS = 3  # transfers per file in one command; each later one resumes the `.part` file


@dataclass(frozen=True)
class Download:
    """One published file. ``sha256``: the publisher's checksum; ``None`` (no publisher gives one) records the
    first download's (trust on first use)."""

    url: str
    path: str  # where it lands, relative to the teachers directory
    publisher: str
    named_in: str  # the publisher's file that gives the URL
    archive: bool = False  # a tar, extracted into the folder it lands in
    sha256: str | None = None


@dataclass(frozen=True)
class Teacher:
    name: str
    architecture: str  # kdzoo model name (`kdzoo list models`)
    download: Download
    path: str  # the checkpoint, relative to the teachers directory
    top1: float | None  # published CIFAR-100 test top-1 (%), None where the publisher reports none
    top1_source: str


_REPDISTILLER_SCRIPT = "HobbitLong/RepDistiller scripts/fetch_pretrained_teachers.sh"
# HobbitLong/RepDistiller README.md, "Benchmark Results on CIFAR-100": the "Teacher <br> Student" row.
_REPDISTILLER_TABLE = "RepDistiller README, CIFAR-100 benchmark tables, teacher row"
# megvii-research/mdistiller README.md: "Download the `cifar_teachers.tar` at .../releases/tag/checkpoints and
# untar it to `./download_ckpts`"; the asset's address follows GitHub's releases/download/<tag>/<asset> form.
_MDISTILLER_TAR = Download(
    url="https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar",
    path="mdistiller/cifar_teachers.tar", publisher="mdistiller",
    named_in="megvii-research/mdistiller README.md (release 'checkpoints')", archive=True)
_MDISTILLER_NO_TOP1 = "mdistiller README reports no teacher accuracy"

# (kdzoo architecture, RepDistiller's folder under save/models, published top-1). The mdistiller tar holds the
# same folder names under cifar_teachers/ (mdistiller/models/cifar/__init__.py, cifar_model_dict).
_PUBLISHED = (
    ("wrn_40_2", "wrn_40_2_vanilla", 75.61),
    ("resnet56", "resnet56_vanilla", 72.34),
    ("resnet110", "resnet110_vanilla", 74.31),
    ("resnet32x4", "resnet32x4_vanilla", 79.42),
    ("vgg13", "vgg13_vanilla", 74.64),
    ("ResNet50", "ResNet50_vanilla", 79.34),
)


def _published_teachers() -> dict[str, Teacher]:
    entries: list[Teacher] = []
    for arch, folder, top1 in _PUBLISHED:
        path = f"repdistiller/{folder}/ckpt_epoch_240.pth"
        url = f"http://shape2prog.csail.mit.edu/repo/{folder}/ckpt_epoch_240.pth"
        entries.append(Teacher(arch, arch, Download(url, path, "RepDistiller", _REPDISTILLER_SCRIPT), path, top1,
                               _REPDISTILLER_TABLE))
    for arch, folder, _ in _PUBLISHED:
        entries.append(Teacher(f"mdistiller/{arch}", arch, _MDISTILLER_TAR,
                               f"mdistiller/cifar_teachers/{folder}/ckpt_epoch_240.pth", None, _MDISTILLER_NO_TOP1))
    return {entry.name: entry for entry in entries}


# Module data, looked up at call time: tests substitute entries with monkeypatch.setattr(teachers, "TEACHERS", ...).
TEACHERS: dict[str, Teacher] = _published_teachers()


# --------------------------------------------------------------------------------------------------- registry


def teachers_dir(directory: str | Path | None = None) -> Path:
    """``directory``, else ``$KDZOO_TEACHERS``, else ``teachers/`` under the working directory."""
    return Path(directory or os.environ.get(ENV_DIR) or DEFAULT_DIR)


def teacher_entry(name: str) -> Teacher:
    if name in TEACHERS:
        return TEACHERS[name]
    close = difflib.get_close_matches(name, list(TEACHERS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UserInputError(f"unknown teacher {name!r}.{hint} `kdzoo teachers list` shows every published teacher")


def select(names: Iterable[str]) -> list[Teacher]:
    names = list(names)
    if not names:
        raise UserInputError("name the teachers to fetch (`kdzoo teachers list` shows them), or `all`")
    if "all" in names:
        return list(TEACHERS.values())
    return [teacher_entry(name) for name in dict.fromkeys(names)]


# --------------------------------------------------------------------------------------------------- manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "files": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"teacher manifest {path} is unreadable ({exc}); delete it and fetch again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserInputError(f"{path} is not a kdzoo teacher manifest; delete it and fetch again")
    return manifest


def _record(directory: Path, entries: dict[str, dict[str, Any]]) -> None:
    manifest = read_manifest(directory)
    manifest["files"].update(entries)
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / MANIFEST)


def verify(directory: Path, relpath: str, fetch_name: str) -> Path:
    """``directory/relpath`` after checking it against the SHA-256 the manifest recorded when it was fetched."""
    path = directory / relpath
    record = read_manifest(directory)["files"].get(relpath)
    if record is None:
        raise UserInputError(f"{path} is not recorded in {directory / MANIFEST}: run `kdzoo teachers fetch "
                             f"{fetch_name}` so its SHA-256 is checked and recorded")
    actual = file_sha256(path)
    if actual != record["sha256"]:
        raise UserInputError(f"{path} does not match the SHA-256 recorded in {directory / MANIFEST} when it was "
                             f"fetched: expected {record['sha256']}, actual {actual}. The file changed or is "
                             f"corrupt: delete it and run `kdzoo teachers fetch {fetch_name}` again")
    return path


def local_status(teacher: Teacher, directory: Path) -> str:
    path = directory / teacher.path
    if not path.is_file():
        return "no"
    record = read_manifest(directory)["files"].get(teacher.path)
    if record is None:
        return "unrecorded"
    return "yes" if file_sha256(path) == record["sha256"] else "HASH MISMATCH"


# --------------------------------------------------------------------------------------------------- resolution


def resolve_checkpoint(checkpoint: str, directory: str | Path | None = None) -> str:
    """``teachers:NAME`` -> the fetched, hash-verified file; any other path unchanged."""
    if not checkpoint.startswith(PREFIX):
        return checkpoint
    name = checkpoint[len(PREFIX):]
    teacher = teacher_entry(name)
    root = teachers_dir(directory)
    if not (root / teacher.path).is_file():
        raise UserInputError(f"teacher {name!r} is not fetched yet (looked for {root / teacher.path}): run "
                             f"`kdzoo teachers fetch {name}` (or set ${ENV_DIR} to the directory that holds it)")
    return str(verify(root, teacher.path, name))


# --------------------------------------------------------------------------------------------------- download


class _Interrupted(Exception):
    """The transfer stopped before the announced size; the `.part` file keeps what arrived."""

    def __init__(self, received: int, total: int | None, cause: str) -> None:
        super().__init__(cause)
        self.received, self.total, self.cause = received, total, cause


def _total_from_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/200`` -> (100, 200); ``bytes */200`` -> (None, 200)."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+)", (value or "").strip())
    if not match:
        return None, None
    return (int(match.group(1)) if match.group(1) else None), int(match.group(2))


def _transfer(url: str, part: Path, by_hand: str, progress: bool | None) -> int:
    """Append the rest of ``url`` to ``part`` (HTTP Range from its size); return the complete size."""
    start = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "kdzoo"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # nothing left to send: complete, or larger than the file
            _, total = _total_from_content_range(exc.headers.get("Content-Range"))
            if total == start:
                return start
            part.unlink()
            raise _Interrupted(0, total, f"the partial file was longer than the server's {total} bytes") from None
        raise UserInputError(f"{url} answered HTTP {exc.code} {exc.reason}. {by_hand}") from None
    except (urllib.error.URLError, OSError) as exc:  # refused, DNS failure, timeout: no network
        reason = getattr(exc, "reason", exc)
        raise UserInputError(f"cannot reach {url} ({reason}). {by_hand}") from None
    with response:
        total: int | None
        if response.status == 206:
            first, total = _total_from_content_range(response.headers.get("Content-Range"))
            if first != start:
                part.unlink()
                raise _Interrupted(0, total, f"the server resumed at byte {first}, not {start}")
        else:  # 200: the whole file (a server that ignores Range starts over)
            start = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        received = start
        with open(part, "ab" if start else "wb") as out, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
            disable=None if progress is None else not progress, leave=False,
        ) as bar:
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise _Interrupted(received, total, f"{type(exc).__name__}: {exc}") from exc
    if total is not None and received != total:  # http.client returns a short body without raising
        raise _Interrupted(received, total, "the connection closed early")
    return received


def _download(download: Download, directory: Path, rerun: str, *, attempts: int, progress: bool | None) -> None:
    target = directory / download.path
    part = target.with_name(target.name + ".part")
    then = "then run `" + rerun + "` again to verify" + (" and extract it" if download.archive else " it")
    by_hand = f"To fetch it by hand: download {download.url} and save it as {target} (exact path), {then}"
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    for attempt in range(1, attempts + 1):
        try:
            size = _transfer(download.url, part, by_hand, progress)
            break
        except _Interrupted as stop:
            if attempt == attempts:
                of = f" of {stop.total}" if stop.total is not None else ""
                raise UserInputError(
                    f"the download of {download.url} stopped after {stop.received}{of} bytes ({stop.cause}); "
                    f"{part} keeps what arrived: run `{rerun}` again to resume") from None
    actual = file_sha256(part)
    if download.sha256 is not None and actual != download.sha256:
        part.unlink()
        raise UserInputError(f"{download.url} downloaded with SHA-256 {actual}, but the registry expects "
                             f"{download.sha256}; the file was deleted, nothing was recorded")
    os.replace(part, target)
    _record(directory, {download.path: {"sha256": actual, "size": size, "url": download.url}})


def _adopt(download: Download, directory: Path) -> None:
    """A file the user saved by hand: checked against the publisher's hash (if any), then recorded."""
    target = directory / download.path
    actual = file_sha256(target)
    if download.sha256 is not None and actual != download.sha256:
        raise UserInputError(f"{target} has SHA-256 {actual}, but the registry expects {download.sha256} for "
                             f"{download.url}: it is not the published file")
    _record(directory, {download.path: {"sha256": actual, "size": target.stat().st_size, "url": download.url}})


# --------------------------------------------------------------------------------------------------- extraction


def _unsafe_reason(member: tarfile.TarInfo, root: Path) -> str | None:
    name = member.name
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "leaves the target directory through '..'"
    if member.issym() or member.islnk():
        return f"is a {'symbolic' if member.issym() else 'hard'} link (to {member.linkname!r})"
    if not (member.isfile() or member.isdir()):
        return "is a device, FIFO or other special file"
    if not (root / name).resolve().is_relative_to(root):
        return "resolves outside the target directory"
    if hasattr(tarfile, "data_filter"):  # Python's own `filter='data'` rules (3.10.12+, 3.11.4+) on top of ours
        try:
            tarfile.data_filter(member, str(root))
        except tarfile.FilterError as exc:
            return f"is refused by tarfile's data filter ({exc})"
    return None


def safe_extract(archive: Path, destination: Path) -> dict[str, int]:
    """Extract the regular files of ``archive`` under ``destination``; return {relative path: size}.

    Every member is checked before anything is written; one unsafe member (absolute path, ``..``, link,
    device) refuses the whole archive. Files are written to a staging folder inside ``destination`` and moved
    into place, so an interrupted extraction leaves no half-written checkpoint."""
    root = destination.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                reason = _unsafe_reason(member, root)
                if reason is not None:
                    raise UserInputError(f"archive {archive} is unsafe: member {member.name!r} {reason}; "
                                         "nothing was extracted")
            files = [m for m in members if m.isfile()]
            staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
            try:
                for member in files:
                    relative = PurePosixPath(member.name).as_posix()
                    staged = staging / relative
                    staged.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file always has data
                    with source, open(staged, "wb") as out:
                        shutil.copyfileobj(source, out, CHUNK)
                extracted: dict[str, int] = {}
                for member in files:
                    relative = PurePosixPath(member.name).as_posix()
                    final = root / relative
                    final.parent.mkdir(parents=True, exist_ok=True)
                    if not final.parent.resolve().is_relative_to(root):  # a pre-existing symlinked folder
                        raise UserInputError(f"{final.parent} leads outside {root}; nothing more was extracted")
                    os.replace(staging / relative, final)
                    extracted[relative] = member.size
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, EOFError) as exc:
        raise UserInputError(f"{archive} is not a readable tar archive ({exc}); delete it and fetch again") from None
    return extracted


def _extract(download: Download, directory: Path) -> None:
    archive = directory / download.path
    base = PurePosixPath(download.path).parent
    files = safe_extract(archive, archive.parent)
    _record(directory, {
        (base / relative).as_posix(): {"sha256": file_sha256(archive.parent / relative), "size": size,
                                       "url": download.url, "archive": download.path}
        for relative, size in files.items()
    })


# --------------------------------------------------------------------------------------------------- fetch


def fetch(names: Iterable[str], directory: str | Path | None = None, *, attempts: int = ATTEMPTS,
          progress: bool | None = None) -> list[tuple[Teacher, Path]]:
    """Download (resuming a ``.part`` file), hash, record and extract the named teachers (``all``: every one);
    what is present already is only verified. Returns each teacher with its checkpoint path."""
    chosen = select(names)
    root = teachers_dir(directory)
    root.mkdir(parents=True, exist_ok=True)
    flag = f" --dir {directory}" if directory else ""
    by_download: dict[Download, list[Teacher]] = {}
    for teacher in chosen:
        by_download.setdefault(teacher.download, []).append(teacher)
    for download, members in by_download.items():
        rerun = f"kdzoo teachers fetch {' '.join(t.name for t in members)}{flag}"
        if all((root / t.path).is_file() and t.path in read_manifest(root)["files"] for t in members):
            continue  # verified below
        target = root / download.path
        if not target.is_file():
            _download(download, root, rerun, attempts=attempts, progress=progress)
        elif download.path not in read_manifest(root)["files"]:
            _adopt(download, root)
        else:
            verify(root, download.path, members[0].name)
        if download.archive:
            _extract(download, root)
            missing = [t.path for t in members if not (root / t.path).is_file()]
            if missing:
                raise UserInputError(f"{target} does not hold {', '.join(missing)}: the published archive changed; "
                                     "the teachers it does hold are recorded in the manifest")
    return [(teacher, verify(root, teacher.path, teacher.name)) for teacher in chosen]


# --------------------------------------------------------------------------------------------------- listing


def format_listing(directory: str | Path | None = None) -> str:
    root = teachers_dir(directory)
    rows = [("name", "architecture", "top-1", "source", "present", "url")]
    for teacher in TEACHERS.values():
        top1 = f"{teacher.top1:.2f}" if teacher.top1 is not None else "-"
        rows.append((teacher.name, teacher.architecture, top1, teacher.download.publisher,
                     local_status(teacher, root), teacher.download.url))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]
    sources = sorted({(t.top1_source, t.download.named_in) for t in TEACHERS.values()})
    lines.append("")
    lines.append(f"teachers directory: {root} (--dir or ${ENV_DIR}); top-1: CIFAR-100 test accuracy (%) as published")
    lines.extend(f"  {source}; files named in {named_in}" for source, named_in in sources)
    return "\n".join(lines)


def eval_hint(teacher: Teacher, path: Path) -> str:
    published = (f"published top-1 {teacher.top1:.2f} ({teacher.top1_source})" if teacher.top1 is not None
                 else f"no published top-1 ({teacher.top1_source})")
    return (f"{teacher.name}: {path}, {published}. Its accuracy on your test set, next to the published one: "
            f"kdzoo eval --checkpoint {PREFIX}{teacher.name} data.dataset=cifar100 data.root=DATA_ROOT")

"""`kdzoo teachers`: the published-teacher registry, resumable verified downloads from a local HTTP server,
safe tar extraction and ``teachers:NAME`` checkpoints in a config (docs/teachers.md)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import kdzoo
from kdzoo import teachers
from kdzoo.cli import main
from kdzoo.config.loader import config_from_dict
from kdzoo.engine.setup import prepare_run
from kdzoo.errors import UserInputError
from kdzoo.models.registry import model_entry
from kdzoo.teachers import Download, Teacher


@dataclass
class Served:
    """What the test server holds and saw: path -> bytes, the Range header of every GET."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the connection drops, once
    ignore_range: bool = False


class RangeHandler(BaseHTTPRequestHandler):
    served: Served  # set on the subclass each server gets

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        served = self.served
        blob = served.blobs.get(self.path)
        byte_range = self.headers.get("Range")
        served.requests.append((self.path, byte_range))
        if blob is None:
            self.send_error(404)
            return
        start = 0
        if byte_range and not served.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", byte_range).group(1))
            if start >= len(blob):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(blob)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(blob) - start))
        self.end_headers()
        body = blob[start:]
        drop = served.drop_after.pop(self.path, None)
        self.wfile.write(body if drop is None else body[:drop])  # HTTP/1.0: the connection closes after this

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, Served]]:
    served = Served()
    handler = type("Handler", (RangeHandler,), {"served": served})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()


def checkpoint_bytes(seed: int = 0) -> tuple[bytes, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    state = kdzoo.create_model("resnet8", num_classes=10).state_dict()
    buffer = io.BytesIO()
    torch.save({"model": state, "epoch": 240}, buffer)
    return buffer.getvalue(), state


def single_file_teacher(monkeypatch, base: str, served: Served, blob: bytes, sha256: str | None = None) -> Teacher:
    served.blobs["/tiny/ckpt_epoch_240.pth"] = blob
    path = "test/tiny_vanilla/ckpt_epoch_240.pth"
    entry = Teacher("tiny", "resnet8", Download(f"{base}/tiny/ckpt_epoch_240.pth", path, "tests", "this test",
                                                sha256=sha256), path, 12.5, "test table")
    monkeypatch.setattr(teachers, "TEACHERS", {"tiny": entry})
    return entry


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def archive_teachers(monkeypatch, base: str, served: Served, archive: bytes, names: dict[str, str]) -> None:
    served.blobs["/release/pack.tar"] = archive
    download = Download(f"{base}/release/pack.tar", "pack/pack.tar", "tests", "this test", archive=True)
    monkeypatch.setattr(teachers, "TEACHERS", {
        name: Teacher(name, "resnet8", download, f"pack/{member}", None, "none reported")
        for name, member in names.items()
    })


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------- registry


def test_published_registry_matches_the_sources():
    # HobbitLong/RepDistiller README, CIFAR-100 tables, "Teacher <br> Student" row (teacher's figure).
    readme_top1 = {"wrn_40_2": 75.61, "resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "vgg13": 74.64,
                   "ResNet50": 79.34}
    published = teachers.TEACHERS
    assert {n: t.top1 for n, t in published.items() if t.download.publisher == "RepDistiller"} == readme_top1
    for arch in readme_top1:
        repdistiller, mdistiller = published[arch], published[f"mdistiller/{arch}"]
        # scripts/fetch_pretrained_teachers.sh: wget .../repo/<arch>_vanilla/ckpt_epoch_240.pth into save/models.
        assert repdistiller.download.url == f"http://shape2prog.csail.mit.edu/repo/{arch}_vanilla/ckpt_epoch_240.pth"
        assert repdistiller.path == f"repdistiller/{arch}_vanilla/ckpt_epoch_240.pth"
        assert mdistiller.path == f"mdistiller/cifar_teachers/{arch}_vanilla/ckpt_epoch_240.pth"
        assert mdistiller.top1 is None
        for entry in (repdistiller, mdistiller):
            assert model_entry(entry.architecture).name == arch  # a registered kdzoo model
    archives = {t.download for t in published.values() if t.download.publisher == "mdistiller"}
    assert [a.url for a in archives] == [
        "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"]
    assert len(published) == 12


def test_unknown_teacher_name_suggests_the_close_ones():
    with pytest.raises(UserInputError, match=r"unknown teacher 'resnet32x5'\. Did you mean 'resnet32x4'"):
        teachers.fetch(["resnet32x5"], "unused")


# --------------------------------------------------------------------------------------------------- download


def test_fetch_downloads_records_the_hash_and_then_only_verifies(monkeypatch, tmp_path, server, capsys):
    base, served = server
    blob, _ = checkpoint_bytes()
    entry = single_file_teacher(monkeypatch, base, served, blob)
    assert main(["teachers", "fetch", "tiny", "--dir", str(tmp_path)]) == 0
    target = tmp_path / entry.path
    assert target.read_bytes() == blob
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"][entry.path] == {"sha256": sha(blob), "size": len(blob), "url": entry.download.url}
    out = capsys.readouterr().out
    assert "kdzoo eval --checkpoint teachers:tiny data.dataset=cifar100" in out
    assert "published top-1 12.50 (test table)" in out
    assert served.requests == [("/tiny/ckpt_epoch_240.pth", None)]
    assert main(["teachers", "fetch", "all", "--dir", str(tmp_path)]) == 0
    assert len(served.requests) == 1  # present and verified: no second download
    listing = teachers.format_listing(tmp_path).splitlines()
    assert listing[1].split()[:5] == ["tiny", "resnet8", "12.50", "tests", "yes"]


def test_interrupted_download_resumes_with_range(monkeypatch, tmp_path, server):
    base, served = server
    blob, _ = checkpoint_bytes()
    entry = single_file_teacher(monkeypatch, base, served, blob)
    cut = len(blob) // 3
    served.drop_after["/tiny/ckpt_epoch_240.pth"] = cut
    with pytest.raises(UserInputError, match=rf"stopped after {cut} of {len(blob)} bytes .* again to resume"):
        teachers.fetch(["tiny"], tmp_path, attempts=1)
    part = tmp_path / (entry.path + ".part")
    assert part.read_bytes() == blob[:cut]
    assert not (tmp_path / entry.path).exists()
    teachers.fetch(["tiny"], tmp_path, attempts=1)
    assert served.requests == [("/tiny/ckpt_epoch_240.pth", None), ("/tiny/ckpt_epoch_240.pth", f"bytes={cut}-")]
    assert (tmp_path / entry.path).read_bytes() == blob
    assert not part.exists()
    assert teachers.read_manifest(tmp_path)["files"][entry.path]["sha256"] == sha(blob)


def test_one_command_retries_and_resumes_by_itself(monkeypatch, tmp_path, server):
    base, served = server
    blob, _ = checkpoint_bytes()
    entry = single_file_teacher(monkeypatch, base, served, blob)
    served.drop_after["/tiny/ckpt_epoch_240.pth"] = 1000
    teachers.fetch(["tiny"], tmp_path)
    assert [r for _, r in served.requests] == [None, "bytes=1000-"]
    assert sha((tmp_path / entry.path).read_bytes()) == sha(blob)


def test_server_that_ignores_range_restarts_the_file(monkeypatch, tmp_path, server):
    base, served = server
    blob, _ = checkpoint_bytes()
    entry = single_file_teacher(monkeypatch, base, served, blob)
    served.ignore_range = True
    part = tmp_path / (entry.path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 500)  # not a prefix of the file: a 200 answer must replace it, not be appended
    teachers.fetch(["tiny"], tmp_path)
    assert served.requests == [("/tiny/ckpt_epoch_240.pth", "bytes=500-")]
    assert (tmp_path / entry.path).read_bytes() == blob


def test_complete_part_file_is_finished_by_a_416_answer(monkeypatch, tmp_path, server):
    base, served = server
    blob, _ = checkpoint_bytes()
    entry = single_file_teacher(monkeypatch, base, served, blob)
    part = tmp_path / (entry.path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(blob)
    teachers.fetch(["tiny"], tmp_path)
    assert served.requests == [("/tiny/ckpt_epoch_240.pth", f"bytes={len(blob)}-")]
    assert (tmp_path / entry.path).read_bytes() == blob


def test_registry_hash_mismatch_refuses_the_download(monkeypatch, tmp_path, server):
    base, served = server
    blob, _ = checkpoint_bytes()
    expected = "0" * 64
    entry = single_file_teacher(monkeypatch, base, served, blob, sha256=expected)
    with pytest.raises(UserInputError) as caught:
        teachers.fetch(["tiny"], tmp_path)
    assert f"downloaded with SHA-256 {sha(blob)}, but the registry expects {expected}" in str(caught.value)
    assert entry.download.url in str(caught.value)
    assert not (tmp_path / entry.path).exists()
    assert not (tmp_path / (entry.path + ".part")).exists()
    assert teachers.read_manifest(tmp_path)["files"] == {}


def test_changed_file_or_tampered_manifest_is_refused_on_later_use(monkeypatch, tmp_path, server):
    base, served = server
    blob, _ = checkpoint_bytes()
    entry = single_file_teacher(monkeypatch, base, served, blob)
    teachers.fetch(["tiny"], tmp_path)
    target = tmp_path / entry.path
    changed = blob[:-1] + bytes([blob[-1] ^ 1])
    target.write_bytes(changed)
    for use in (lambda: teachers.fetch(["tiny"], tmp_path), lambda: teachers.resolve_checkpoint("teachers:tiny",
                                                                                                 tmp_path)):
        with pytest.raises(UserInputError) as caught:
            use()
        message = str(caught.value)
        assert str(target) in message
        assert f"expected {sha(blob)}, actual {sha(changed)}" in message
    assert teachers.local_status(entry, tmp_path) == "HASH MISMATCH"
    target.write_bytes(blob)
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][entry.path]["sha256"] = "f" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match=f"expected {'f' * 64}, actual {sha(blob)}"):
        teachers.resolve_checkpoint("teachers:tiny", tmp_path)


def test_offline_names_the_url_and_the_exact_path(monkeypatch, tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = "test/tiny_vanilla/ckpt_epoch_240.pth"
    url = f"http://127.0.0.1:{port}/tiny/ckpt_epoch_240.pth"
    monkeypatch.setattr(teachers, "TEACHERS", {"tiny": Teacher("tiny", "resnet8", Download(url, path, "t", "t"),
                                                               path, None, "none")})
    assert main(["teachers", "fetch", "tiny", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach {url}" in err
    assert f"download {url} and save it as {tmp_path / path} (exact path)" in err
    assert f"run `kdzoo teachers fetch tiny --dir {tmp_path}` again" in err


def test_a_file_saved_by_hand_is_recorded_without_a_download(monkeypatch, tmp_path):
    blob, _ = checkpoint_bytes()
    path = "test/tiny_vanilla/ckpt_epoch_240.pth"
    monkeypatch.setattr(teachers, "TEACHERS", {"tiny": Teacher(
        "tiny", "resnet8", Download("http://127.0.0.1:9/none", path, "t", "t"), path, None, "none")})
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_bytes(blob)
    [(_, resolved)] = teachers.fetch(["tiny"], tmp_path)
    assert resolved == tmp_path / path
    assert teachers.read_manifest(tmp_path)["files"][path]["sha256"] == sha(blob)


# --------------------------------------------------------------------------------------------------- archives


def test_archive_is_extracted_and_every_member_recorded(monkeypatch, tmp_path, server):
    base, served = server
    first, second = checkpoint_bytes(0)[0], checkpoint_bytes(1)[0]
    archive = tar_bytes([(_member("cifar_teachers/a_vanilla", tarfile.DIRTYPE), None),
                         (tarfile.TarInfo("cifar_teachers/a_vanilla/ckpt_epoch_240.pth"), first),
                         (tarfile.TarInfo("cifar_teachers/b_vanilla/ckpt_epoch_240.pth"), second)])
    archive_teachers(monkeypatch, base, served, archive, {"a": "cifar_teachers/a_vanilla/ckpt_epoch_240.pth",
                                                          "b": "cifar_teachers/b_vanilla/ckpt_epoch_240.pth"})
    fetched = dict((t.name, p) for t, p in teachers.fetch(["a"], tmp_path))
    assert fetched == {"a": tmp_path / "pack/cifar_teachers/a_vanilla/ckpt_epoch_240.pth"}
    assert fetched["a"].read_bytes() == first
    files = teachers.read_manifest(tmp_path)["files"]
    assert files["pack/pack.tar"]["sha256"] == sha(archive)
    assert files["pack/cifar_teachers/b_vanilla/ckpt_epoch_240.pth"] == {
        "sha256": sha(second), "size": len(second), "url": f"{base}/release/pack.tar", "archive": "pack/pack.tar"}
    assert teachers.resolve_checkpoint("teachers:b", tmp_path) == str(tmp_path / "pack/cifar_teachers/b_vanilla"
                                                                      "/ckpt_epoch_240.pth")
    assert sorted(p.name for p in (tmp_path / "pack").iterdir()) == ["cifar_teachers", "pack.tar"]  # no staging


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(("bad", "reason"), [
    ("absolute", "has an absolute path"),
    ("dotdot", "leaves the target directory through '..'"),
    ("symlink", "is a symbolic link"),
    ("hardlink", "is a hard link"),
    ("device", "is a device, FIFO or other special file"),
])
def test_malicious_archive_is_refused_and_nothing_is_written(monkeypatch, tmp_path, server, bad, reason):
    base, served = server
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = {
        "absolute": (_member(str(outside / "evil.pth")), b"evil"),
        "dotdot": (_member("cifar_teachers/../../../outside/evil.pth"), b"evil"),
        "symlink": (_member("cifar_teachers/link", tarfile.SYMTYPE, str(outside)), None),
        "hardlink": (_member("cifar_teachers/link", tarfile.LNKTYPE, str(outside / "evil.pth")), None),
        "device": (_member("cifar_teachers/null", tarfile.CHRTYPE), None),
    }[bad]
    good = (tarfile.TarInfo("cifar_teachers/a_vanilla/ckpt_epoch_240.pth"), b"good")
    archive = tar_bytes([good, evil])
    root = tmp_path / "teachers"
    archive_teachers(monkeypatch, base, served, archive, {"a": "cifar_teachers/a_vanilla/ckpt_epoch_240.pth"})
    with pytest.raises(UserInputError) as caught:
        teachers.fetch(["a"], root)
    assert f"member {evil[0].name!r} {reason}" in str(caught.value)
    assert "nothing was extracted" in str(caught.value)
    assert list(outside.iterdir()) == []
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "outside", "teachers", "teachers/manifest.json", "teachers/pack", "teachers/pack/pack.tar"]


# --------------------------------------------------------------------------------------------------- in a config


def test_teachers_name_in_a_config_loads_the_fetched_file(monkeypatch, tmp_path, server):
    base, served = server
    blob, state = checkpoint_bytes(seed=7)
    single_file_teacher(monkeypatch, base, served, blob)
    monkeypatch.setenv(teachers.ENV_DIR, str(tmp_path / "zoo"))
    raw = {
        "experiment": {"output_dir": str(tmp_path / "runs")},
        "data": {"dataset": "mnist5k", "batch_size": 16, "subset": 32, "test_subset": 16},
        "teacher": {"name": "resnet8", "checkpoint": "teachers:tiny"},
        "student": {"name": "resnet8"},
        "method": {"name": "kd"},
        "schedule": {"epochs": 1, "milestones": []},
        "runtime": {"device": "cpu", "progress": False, "tensorboard": False, "threads": 1},
    }
    cfg = config_from_dict(raw)  # validation needs nothing on disk
    with pytest.raises(UserInputError, match=r"teacher 'tiny' is not fetched yet .* `kdzoo teachers fetch tiny`"):
        prepare_run(cfg)
    teachers.fetch(["tiny"])
    teacher = prepare_run(cfg).distiller.teacher
    loaded = teacher.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not (tmp_path / "runs").exists()


def test_eval_of_a_published_teacher_prints_the_published_top1_next_to_the_measured(monkeypatch, tmp_path, server,
                                                                                     capsys):
    base, served = server
    blob, _ = checkpoint_bytes(seed=3)
    single_file_teacher(monkeypatch, base, served, blob)
    monkeypatch.setenv(teachers.ENV_DIR, str(tmp_path / "zoo"))
    teachers.fetch(["tiny"])
    capsys.readouterr()
    scores = tmp_path / "scores.json"
    assert main(["eval", "--checkpoint", "teachers:tiny", "--json", str(scores), "data.dataset=mnist5k",
                 "data.test_subset=32", "runtime.device=cpu"]) == 0
    out = capsys.readouterr().out
    top1 = json.loads(scores.read_text())["metrics"]["top1"]
    assert f"top-1 {top1:.2f}" in out  # the registry's architecture (resnet8) was built without --model
    assert f"published top-1 12.50 (test table): this test set gives {top1 - 12.5:+.2f}" in out

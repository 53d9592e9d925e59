"""Real-dataset sources against a local HTTP server: complete, resumed and corrupt downloads,
extraction, and the list builders of the official split files."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from mme.data import sources
from mme.data.manifests import Manifest, Resource
from mme.data.manifests.splits import hmdb51_split, k400_entries, ssv2_split
from mme.data.sources import ChecksumError, DownloadError, ExtractError, download, extract

PAYLOAD = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
DROP_AT = 70_000


class _Handler(BaseHTTPRequestHandler):
    """Serves `server.files`, honours `Range: bytes=N-`, and can drop the connection mid-body."""

    def do_GET(self):  # noqa: N802 (http.server naming)
        server = self.server
        data = server.files.get(self.path)
        server.requests.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_error(404)
            return
        start = 0
        wanted = self.headers.get("Range")
        if wanted and not server.ignore_range:
            start = int(wanted.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drops > 0:  # announce the whole body, send part of it, hang up
            server.drops -= 1
            self.wfile.write(body[:DROP_AT])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files = {"/data.bin": PAYLOAD}
    httpd.requests, httpd.drops, httpd.ignore_range = [], 0, False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_complete_download_is_verified_and_renamed(server, tmp_path):
    dest = download(f"{server.url}/data.bin", tmp_path / "data.bin", sha256=SHA256, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "data.bin.part").exists()
    assert server.requests == [("/data.bin", None)]
    download(f"{server.url}/data.bin", dest, sha256=SHA256, progress=False)  # present + verified: no request
    assert len(server.requests) == 1


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    server.drops = 1
    dest = download(f"{server.url}/data.bin", tmp_path / "data.bin", sha256=SHA256, backoff=0, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/data.bin", None), ("/data.bin", f"bytes={DROP_AT}-")]


def test_interrupted_run_leaves_a_part_that_the_next_run_resumes(server, tmp_path):
    server.drops = 1
    with pytest.raises(DownloadError, match=r"data\.bin.*resume"):
        download(f"{server.url}/data.bin", tmp_path / "data.bin", sha256=SHA256, retries=0, progress=False)
    assert not (tmp_path / "data.bin").exists()
    assert (tmp_path / "data.bin.part").stat().st_size == DROP_AT
    download(f"{server.url}/data.bin", tmp_path / "data.bin", md5=hashlib.md5(PAYLOAD).hexdigest(), progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/data.bin", f"bytes={DROP_AT}-")


def test_checksum_mismatch_fails_clearly_and_leaves_nothing_trusted(server, tmp_path):
    url, wrong = f"{server.url}/data.bin", "0" * 64
    with pytest.raises(ChecksumError) as error:
        download(url, tmp_path / "data.bin", sha256=wrong, progress=False)
    message = str(error.value)
    assert url in message and wrong in message and SHA256 in message
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()
    assert (tmp_path / "data.bin.corrupt").exists()
    download(url, tmp_path / "data.bin", sha256=SHA256, progress=False)  # starts from scratch, no Range
    assert server.requests[-1] == ("/data.bin", None)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_tampered_final_file_is_not_trusted(server, tmp_path):
    (tmp_path / "data.bin").write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(ChecksumError):
        download(f"{server.url}/data.bin", tmp_path / "data.bin", sha256=SHA256, progress=False)
    assert not (tmp_path / "data.bin").exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "data.bin.part").write_bytes(b"stale bytes from another file")
    download(f"{server.url}/data.bin", tmp_path / "data.bin", sha256=SHA256, progress=False)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_http_404_names_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match=r"missing\.bin.*404"):
        download(f"{server.url}/missing.bin", tmp_path / "missing.bin", progress=False)


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_extract_zip_and_tar_merge_and_mark_done(tmp_path):
    (tmp_path / "a.zip").write_bytes(_zip_bytes({"top/x.txt": b"x", "top/sub/y.txt": b"y"}))
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as archive:
        info = tarfile.TarInfo("top/sub/z.txt")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"z"))
    out = tmp_path / "out"
    extract(tmp_path / "a.zip", out)
    extract(tmp_path / "b.tar.gz", out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.txt")) == ["top/sub/y.txt", "top/sub/z.txt",
                                                                                  "top/x.txt"]
    (out / "top" / "x.txt").unlink()
    extract(tmp_path / "a.zip", out)  # marked done: not unpacked again
    assert not (out / "top" / "x.txt").exists()
    (tmp_path / "bad.zip").write_bytes(b"PK not really a zip")
    with pytest.raises(ExtractError, match="bad.zip"):
        extract(tmp_path / "bad.zip", out)


def test_rar_without_a_tool_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(sources.shutil, "which", lambda *_: None)
    (tmp_path / "v.rar").write_bytes(b"Rar!")
    with pytest.raises(ExtractError, match=r"v\.rar.*apt-get install unar"):
        extract(tmp_path / "v.rar", tmp_path / "out")


def test_prepare_ucf101_end_to_end(server, tmp_path, monkeypatch):
    """The real UCF101 path (download, verify, extract, official split 1) with archives served locally."""
    videos = {f"UCF-101/{c}/v_{c}_g0{g}_c01.avi": b"fake" for c in ("ApplyEyeMakeup", "Archery") for g in (1, 2, 3)}
    del videos["UCF-101/Archery/v_Archery_g03_c01.avi"]  # listed but missing: skipped and named
    splits = {"ucfTrainTestlist/classInd.txt": b"1 ApplyEyeMakeup\n2 Archery\n",
              "ucfTrainTestlist/trainlist01.txt": b"ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi 1\n"
                                                  b"ApplyEyeMakeup/v_ApplyEyeMakeup_g03_c01.avi 1\n"
                                                  b"Archery/v_Archery_g02_c01.avi 2\nArchery/v_Archery_g03_c01.avi 2\n",
              "ucfTrainTestlist/testlist01.txt": b"ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n"
                                                 b"Archery/v_Archery_g01_c01.avi\n"}
    server.files = {"/videos.zip": _zip_bytes(videos), "/splits.zip": _zip_bytes(splits)}
    resources = tuple(Resource(f"{server.url}{name}", name.strip("/"), "zip",
                               sha256=hashlib.sha256(data).hexdigest()) for name, data in server.files.items())
    monkeypatch.setitem(sources.MANIFESTS, "ucf101", Manifest("ucf101", "local", resources))
    prepared = sources.prepare_ucf101(tmp_path, split=1, progress=False)
    assert prepared.classes == ["ApplyEyeMakeup", "Archery"]
    assert prepared.splits["train"] == [
        ("data/raw/ucf101/UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi", 0),
        ("data/raw/ucf101/UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g03_c01.avi", 0),
        ("data/raw/ucf101/UCF-101/Archery/v_Archery_g02_c01.avi", 1)]
    assert [label for _, label in prepared.splits["test"]] == [0, 1]
    assert prepared.splits["val"] == prepared.splits["test"]
    assert [name for name, _ in prepared.skipped] == ["Archery/v_Archery_g03_c01.avi"]
    count = len(server.requests)
    sources.prepare_ucf101(tmp_path, split=1, progress=False)  # extracted already: nothing downloaded again
    assert len(server.requests) == count


def test_hmdb51_split_reader(tmp_path):
    (tmp_path / "wave_test_split2.txt").write_text("w1.avi 1\nw2.avi 2\nw3.avi 0\n")
    (tmp_path / "brush_hair_test_split2.txt").write_text("b1.avi 2 \nb2.avi 1 \n")
    classes, train, test = hmdb51_split(tmp_path, 2)
    assert classes == ["brush_hair", "wave"]
    assert train == [("brush_hair/b2.avi", 0), ("wave/w1.avi", 1)]
    assert test == [("brush_hair/b1.avi", 0), ("wave/w2.avi", 1)]


def test_k400_csv_reader(tmp_path):
    (tmp_path / "val.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                      "abseiling,--07WQ2iBlw,1,11,val\nair drumming,-0x,25.0,35.0,val\n")
    assert k400_entries(tmp_path / "val.csv") == [("abseiling", "--07WQ2iBlw_000001_000011.mp4"),
                                                  ("air drumming", "-0x_000025_000035.mp4")]


def _ssv2_folder(root: Path) -> None:
    (root / "labels").mkdir(parents=True)
    (root / "videos").mkdir()
    labels = {"Pushing something from left to right": "1", "Holding something": "0"}
    (root / "labels" / "something-something-v2-labels.json").write_text(json.dumps(labels))
    train = [{"id": "10", "template": "Holding [something]"},
             {"id": "11", "template": "Pushing [something] from left to right"}]
    val = [{"id": "12", "template": "Pushing [something] from left to right"}, {"id": "13", "template": "Holding "
                                                                                 "[something]"}]
    (root / "labels" / "something-something-v2-train.json").write_text(json.dumps(train))
    (root / "labels" / "something-something-v2-validation.json").write_text(json.dumps(val))
    for name in ("10", "11", "12"):
        (root / "videos" / f"{name}.webm").write_bytes(b"webm")


def test_ssv2_from_a_local_copy(tmp_path):
    _ssv2_folder(tmp_path / "ssv2")
    classes, train, _ = ssv2_split(*(tmp_path / "ssv2" / "labels" / f"something-something-v2-{n}.json"
                                     for n in ("labels", "train", "validation")))
    assert classes == ["Holding something", "Pushing something from left to right"] and train == [("10", 0), ("11", 1)]
    prepared = sources.prepare_ssv2(tmp_path / "work", str(tmp_path / "ssv2"))
    assert [Path(p).name for p, _ in prepared.splits["train"]] == ["10.webm", "11.webm"]
    assert prepared.splits["test"] == [(str(tmp_path / "ssv2" / "videos" / "12.webm"), 1)]
    assert prepared.skipped == [("13", "listed in the official split but not found after extraction")]
    with pytest.raises(FileNotFoundError, match="(?s)data.folder.*qualcomm"):
        sources.prepare_ssv2(tmp_path / "work", "")

"""The resumable, verified download, against a small file served on 127.0.0.1 by the test."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading

import pytest

from depthpro_fast import cli
from depthpro_fast.download import ChecksumError, DownloadError, download

PAYLOAD = os.urandom(300_000)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """Serves PAYLOAD at /depth_pro.pt with Range support. Knobs: ``cut_after`` (announce the
    full length, send that many bytes, close: a dropped connection), ``ignore_range``."""

    def __init__(self):
        self.requests: list[dict] = []
        self.cut_after: int | None = None
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if self.path != "/depth_pro.pt":
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    self.wfile.write(body[: server.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/depth_pro.pt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_full_download_with_checks(server, tmp_path):
    path = download(server.url, tmp_path, expected_size=len(PAYLOAD), expected_sha256=SHA,
                    progress=False, timeout=10)
    assert path == tmp_path / "depth_pro.pt" and path.read_bytes() == PAYLOAD
    assert os.listdir(tmp_path) == ["depth_pro.pt"]  # the .part was renamed
    # already there: verified, not fetched again
    n = len(server.requests)
    assert download(server.url, tmp_path, expected_sha256=SHA, progress=False) == path
    assert len(server.requests) == n


def test_resume_after_dropped_connection(server, tmp_path):
    server.cut_after = 120_000
    with pytest.raises(DownloadError, match="resume"):
        download(server.url, tmp_path, progress=False, timeout=10)
    part = tmp_path / "depth_pro.pt.part"
    assert part.stat().st_size == 120_000 and not (tmp_path / "depth_pro.pt").exists()
    server.cut_after = None
    path = download(server.url, tmp_path, expected_size=len(PAYLOAD), expected_sha256=SHA,
                    progress=False, timeout=10)
    assert server.requests[-1]["range"] == "bytes=120000-"  # resumed, not restarted
    assert path.read_bytes() == PAYLOAD and not part.exists()


def test_resume_from_existing_part_file(server, tmp_path):
    (tmp_path / "depth_pro.pt.part").write_bytes(PAYLOAD[:1000])
    path = download(server.url, tmp_path, expected_sha256=SHA, progress=False, timeout=10)
    assert server.requests[-1]["range"] == "bytes=1000-"
    assert path.read_bytes() == PAYLOAD


def test_complete_part_file_and_server_ignoring_range(server, tmp_path):
    part = tmp_path / "depth_pro.pt.part"
    part.write_bytes(PAYLOAD)  # complete but not renamed (interrupted just before): HTTP 416
    assert download(server.url, tmp_path, expected_sha256=SHA, progress=False).read_bytes() \
        == PAYLOAD
    (tmp_path / "depth_pro.pt").unlink()
    server.ignore_range = True  # a server without Range support: start over, no duplication
    part.write_bytes(PAYLOAD[:5000])
    assert download(server.url, tmp_path, expected_sha256=SHA, progress=False).read_bytes() \
        == PAYLOAD


def test_checksum_and_size_mismatch(server, tmp_path):
    with pytest.raises(ChecksumError, match="SHA-256"):
        download(server.url, tmp_path, expected_sha256="0" * 64, progress=False)
    assert os.listdir(tmp_path) == []  # neither a final file nor a bad .part remains
    with pytest.raises(ChecksumError, match="bytes"):
        download(server.url, tmp_path, expected_size=len(PAYLOAD) + 1, progress=False)
    assert not (tmp_path / "depth_pro.pt").exists()
    # a wrong file already in place is reported, not silently accepted or deleted
    (tmp_path / "depth_pro.pt").write_bytes(b"old")
    with pytest.raises(ChecksumError):
        download(server.url, tmp_path, expected_sha256=SHA, progress=False)
    assert (tmp_path / "depth_pro.pt").read_bytes() == b"old"


def test_errors(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(server.url.replace("depth_pro.pt", "missing.pt"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="http"):
        download("ftp://example.com/x", tmp_path)
    with pytest.raises(ValueError, match="64 hex"):
        download(server.url, tmp_path, expected_sha256="abc")
    server.close()
    with pytest.raises(DownloadError, match="cannot reach"):
        download(server.url, tmp_path / "x", progress=False, timeout=5)


def test_cli_download_into_user_cache_found_by_auto(server, tmp_path, monkeypatch, capsys):
    from depthpro_fast import checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(checkpoint.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./checkpoints/depth_pro.pt here
    assert cli.main(["download", "--url", server.url, "--sha256", SHA, "--quiet"]) == 0
    target = tmp_path / "cache" / "depthpro_fast" / "depth_pro.pt"
    assert target.read_bytes() == PAYLOAD
    assert checkpoint.find_checkpoint() == target
    assert str(target) in capsys.readouterr().out
    # a bad checksum: the command fails cleanly (exit 1, message), no traceback
    assert cli.main(["download", "--url", server.url, "--dest", str(tmp_path / "other"),
                     "--sha256", "f" * 64, "--quiet"]) == 1
    assert "SHA-256" in capsys.readouterr().err


def test_failed_download_leaves_no_empty_folder(server, tmp_path):
    server.close()  # no network: nothing can arrive
    dest = tmp_path / "new" / "nested"
    with pytest.raises(DownloadError, match="cannot reach"):
        download(server.url, dest, progress=False, timeout=5)
    assert not (tmp_path / "new").exists()  # both folders it made are gone
    (tmp_path / "mine").mkdir()  # a folder that existed before is kept
    with pytest.raises(DownloadError):
        download(server.url, tmp_path / "mine", progress=False, timeout=5)
    assert (tmp_path / "mine").is_dir()


def test_interrupted_download_keeps_its_folder_for_resuming(server, tmp_path):
    server.cut_after = 1000
    dest = tmp_path / "new"
    with pytest.raises(DownloadError, match="run again to resume"):
        download(server.url, dest, expected_sha256=SHA, progress=False, timeout=10)
    assert (dest / "depth_pro.pt.part").stat().st_size == 1000

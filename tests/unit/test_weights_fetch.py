"""`rsray weights`: the catalog against the libraries' own records, and `fetch` against a real HTTP
server on 127.0.0.1 that honours Range requests and can cut a download short, and moto's S3."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest
import torch

from pipelines.cli import main
from rsray.weights import WeightsError
from rsray.weights_catalog import CATALOG, known
from rsray.weights_fetch import fetch


class _Served(http.server.BaseHTTPRequestHandler):
    """GET of one file, with Range (206); `cut` makes the first full GET stop half way."""

    def do_GET(self):
        data, server = self.server.data, self.server
        server.ranges.append(self.headers.get("Range"))
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        if start >= len(data):
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if server.cut and not start:
            server.cut = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection drops mid-body
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(data, name, cut) -> (URL, server) of a file served on 127.0.0.1; stopped after the test.
    `server.ranges` lists each GET's Range header (None for a whole-file GET)."""
    servers = []

    def start(data: bytes, name: str = "weights.pth", cut: bool = False):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Served)
        server.data, server.cut, server.ranges = data, cut, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/files/{name}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def weights_cache(tmp_path, monkeypatch):
    """Downloads land (and resume) in the test's own folder, never ~/.cache."""
    monkeypatch.setenv("RSRAY_WEIGHTS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def random_bytes(size: int = 300_000) -> tuple[bytes, str]:
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = data.numpy().tobytes()
    return data, hashlib.sha256(data).hexdigest()


def test_an_interrupted_download_resumes_with_a_range_request_and_is_checked(serve, tmp_path, weights_cache):
    """The first GET drops half way; the second asks for the rest only; the whole file's sha256
    matches and its .json record says what it is."""
    data, digest = random_bytes()
    url, server = serve(data, cut=True)
    done = fetch(url, str(tmp_path / "out"), sha256=digest)
    assert server.ranges[0] is None and len(server.ranges) == 2
    resumed_at = int(server.ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(data) // 2, server.ranges  # what arrived before the cut is kept
    assert (tmp_path / "out" / "weights.pth").read_bytes() == data
    record = json.loads((tmp_path / "out" / "weights.pth.json").read_text())
    assert record["sha256"] == digest == done.sha256 and record["bytes"] == len(data) and record["source"] == url
    assert record["path"] == str(tmp_path / "out" / "weights.pth") and not list(weights_cache.glob("*.part"))
    again = fetch(url, str(tmp_path / "again"), sha256=digest)  # the cached, checked copy: no request
    assert len(server.ranges) == 2 and (tmp_path / "again" / "weights.pth").read_bytes() == data
    assert again.sha256 == digest


def test_a_wrong_sha256_is_refused_in_one_line_and_nothing_is_kept(serve, tmp_path, weights_cache, capsys):
    data, digest = random_bytes()
    url, _ = serve(data)
    with pytest.raises(WeightsError, match=f"sha256 {digest}, but 0{{64}} was asked for"):
        fetch(url, str(tmp_path / "out"), sha256="0" * 64)
    assert not (tmp_path / "out").exists() and not list(weights_cache.iterdir())
    assert main(["weights", "fetch", url, "--to", str(tmp_path / "out"), "--sha256", "1" * 64]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"rsray: error: {url}: sha256 {digest}, but 1111") and "\n" not in err[-1]


def test_a_catalog_name_downloads_from_its_url_and_checks_its_digest_prefix(serve, tmp_path, monkeypatch):
    """`fetch resnet50-imagenet` goes to the catalog's URL and checks torchvision's 8-digit prefix:
    a file that does not start with it is refused (the served file stands in for the real one)."""
    import rsray.weights_fetch as weights_fetch
    from rsray.weights_catalog import KnownWeights

    data, digest = random_bytes()
    url, _ = serve(data, name="resnet50-0676ba61.pth")
    for prefix, ok in ((digest[:8], True), ("0676ba61", False)):
        entry = KnownWeights("resnet50-imagenet", "", "", None, url, "", sha256_prefix=prefix)
        monkeypatch.setattr(weights_fetch, "known", lambda name, entry=entry: entry)
        if ok:
            assert fetch("resnet50-imagenet", str(tmp_path / "out")).sha256 == digest
        else:
            with pytest.raises(WeightsError, match="but 0676ba61... was asked for"):
                fetch("resnet50-imagenet", str(tmp_path / "out2"))


def test_fetch_writes_to_s3(serve, tmp_path, s3_bucket, s3_endpoint, capsys):
    import boto3

    data, digest = random_bytes(100_000)
    url, _ = serve(data)
    assert main(["weights", "fetch", url, "--to", f"s3://{s3_bucket}/weights", "--sha256", digest]) == 0
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    assert client.get_object(Bucket=s3_bucket, Key="weights/weights.pth")["Body"].read() == data
    record = json.loads(client.get_object(Bucket=s3_bucket, Key="weights/weights.pth.json")["Body"].read())
    assert record["sha256"] == digest and record["path"] == f"s3://{s3_bucket}/weights/weights.pth"
    assert f"s3://{s3_bucket}/weights/weights.pth#sha256={digest}" in capsys.readouterr().out


def _microsoft_layout(timm_state: dict) -> dict:
    """timm's Swin state dict as Microsoft's release stores it: {'model': ...}, each stage's
    patch merging at the end of the stage before (timm puts it at the start of the next), `head.`
    for timm's `head.fc.`, and the relative-position index buffers it keeps."""
    import re

    out = {}
    for key, value in timm_state.items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key.replace("head.fc.", "head.")] = value
    out["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    return {"model": out}


def test_the_swin_conversion_gives_timms_model_its_own_outputs_back(serve, tmp_path):
    """A small Swin saved in Microsoft's layout, fetched with --convert timm-swin, loads strictly
    into timm's model and computes what the original did."""
    import timm

    torch.manual_seed(0)
    kwargs = dict(embed_dim=32, depths=(2, 2), num_heads=(1, 2), num_classes=5)
    original = timm.create_model("swin_tiny_patch4_window7_224", **kwargs).eval()
    source = tmp_path / "swin_small_test_22k.pth"
    torch.save(_microsoft_layout(original.state_dict()), source)
    assert "layers.0.downsample.reduction.weight" in torch.load(source, weights_only=True)["model"]
    url, _ = serve(source.read_bytes(), name=source.name)
    done = fetch(url, str(tmp_path / "out"), convert="timm-swin")
    assert done.path.endswith("swin_small_test_22k-timm.pth") and done.converted == "timm-swin"
    converted = timm.create_model("swin_tiny_patch4_window7_224", **kwargs).eval()
    converted.load_state_dict(torch.load(done.path, weights_only=True))
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(converted(image), original(image))


def test_the_catalog_says_what_timm_and_torchvision_say():
    """Every Hub name and URL of a timm model in the catalog is timm's own pretrained config for
    it; torchvision's ResNet-50 file is the one its weights enum downloads, named by the digest."""
    import timm.models
    from torchvision.models import ResNet50_Weights

    timm_entries = [entry for entry in CATALOG if entry.hub and entry.hub.startswith("hf-hub:timm/")]
    assert len(timm_entries) == 3
    for entry in timm_entries:
        cfg = timm.models.get_pretrained_cfg(entry.hub.removeprefix("hf-hub:timm/"))
        assert cfg.hf_hub_id == entry.hub.removeprefix("hf-hub:") and cfg.url == entry.url, entry.name
    resnet = known("resnet50-imagenet")
    assert resnet.url == ResNet50_Weights.IMAGENET1K_V1.url and f"-{resnet.sha256_prefix}.pth" in resnet.url
    assert known("hf-hub:timm/swin_tiny_patch4_window7_224.ms_in22k").name == "swin-t-in22k"


def test_list_and_verify(capsys, tmp_path):
    from rsray.pretrained import packaged_path
    from rsray.weights import sha256_of, weights_file

    assert main(["weights", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{entry.name}: " in listed for entry in CATALOG) and "hf-hub:timm/resnet50.tv_in1k" in listed
    assert main(["weights", "list", "--json"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == [entry.name for entry in CATALOG]
    assert main(["weights", "verify", "minilm"]) == 0
    digest = sha256_of(weights_file(packaged_path("minilm"), "minilm"))
    assert digest == known("minilm").sha256_prefix and f"pin it with minilm#sha256={digest}" in capsys.readouterr().out
    other = tmp_path / "w.pth"
    other.write_bytes(b"x")
    assert main(["weights", "verify", f"{other}#sha256={'0' * 64}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"rsray: error: {other}: sha256 ")
    assert main(["weights", "fetch", "resnet50-aid", "--to", str(tmp_path)]) == 2
    assert "resnet50-aid: no public download is known" in capsys.readouterr().err


def test_a_token_in_the_url_reaches_neither_the_record_nor_the_console(serve, tmp_path, capsys):
    """A presigned or token URL downloads with its token; what is written and printed hides it."""
    data, digest = random_bytes(10_000)
    url, _ = serve(data)
    secret_url = f"{url}?token=s3cr3t-value&X-Amz-Signature=f00ba4"
    assert main(["weights", "fetch", secret_url, "--to", str(tmp_path / "out"), "--sha256", digest]) == 0
    record = (tmp_path / "out" / "weights.pth.json").read_text()
    printed = capsys.readouterr()
    for text in (record, printed.out, printed.err):
        assert "s3cr3t-value" not in text and "f00ba4" not in text
    assert json.loads(record)["source"] == f"{url}?token=***&X-Amz-Signature=***"
    assert main(["weights", "fetch", secret_url, "--to", str(tmp_path / "out2"), "--sha256", "0" * 64]) == 2
    assert "s3cr3t-value" not in capsys.readouterr().err

"""trainer serve, used as people use it: a real server on a free local port, real uploads, a real browser."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from tests.models import trainer
from tests.test_infer import odd_versions
from trainer.infer import Classifier
from trainer.serve.app import ServeConfig, create_app
from trainer.serve.local import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(shapes_model):
    with serving(shapes_model.ckpt, "--max-upload-mb", "1", "--max-wait-ms", "50") as url:
        yield url


def predict_files(ckpt: Path, files: list[Path], tmp_path: Path) -> dict[str, dict]:
    out = tmp_path / "preds.json"
    done = trainer("predict", ckpt, *files, "--out", out)
    assert done.returncode == 0, done.stderr
    return {entry["file"]: entry for entry in json.loads(out.read_text())}


def test_answers_equal_trainer_predict_for_plain_and_odd_images(server, shapes_model, tmp_path: Path) -> None:
    """Multipart and raw bytes; greyscale, CMYK, 16-bit, alpha and EXIF-rotated files: the server's top-5
    is `trainer predict`'s on the same file (same labels, probabilities within 1e-4)."""
    original = Image.open(next((shapes_model.source / "triangle").glob("*.jpg")))
    files = list(odd_versions(original, tmp_path / "odd").values())
    expected = predict_files(shapes_model.ckpt, files, tmp_path)
    for path in files:
        with open(path, "rb") as f:
            multipart = httpx.post(f"{server}/predict", files={"file": (path.name, f, "application/octet-stream")})
        raw = httpx.post(f"{server}/predict?k=2", content=path.read_bytes())
        assert multipart.status_code == raw.status_code == 200, (path.name, multipart.text)
        top, want = multipart.json()["top"], expected[str(path)]["top"]
        assert [t["label"] for t in top] == [w["label"] for w in want], path.name
        assert max(abs(t["prob"] - w["prob"]) for t, w in zip(top, want)) < 1e-4, path.name
        assert raw.json()["top"] == top[:2]
    assert multipart.json()["model"] == "efficientnet_lite0"


def bomb() -> bytes:
    data = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(data, "PNG")  # 144 Mpixels in ~20 KB
    return data.getvalue()


def bad_uploads(shapes_model) -> dict[str, tuple[bytes, int]]:
    jpeg = next((shapes_model.source / "cross").glob("*.jpg")).read_bytes()
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, "PNG")
    corrupt = bytearray(png.getvalue())
    start = corrupt.index(b"IDAT") + 8
    corrupt[start:start + 64] = bytes(64)
    return {"empty": (b"", 400), "text": (b"hello, this is not a picture", 415),
            "truncated": (jpeg[: len(jpeg) // 2], 422), "corrupt": (bytes(corrupt), 422),
            "bomb": (bomb(), 422), "too_big": (jpeg + bytes(1_100_000), 413)}


def test_every_bad_upload_is_a_clear_4xx(server, shapes_model) -> None:
    for name, (data, status) in bad_uploads(shapes_model).items():
        for response in (httpx.post(f"{server}/predict", content=data),
                         httpx.post(f"{server}/predict", files={"file": (f"{name}.jpg", data, "image/jpeg")})):
            assert response.status_code == status, (name, response.status_code, response.text)
            detail = response.json()["detail"]
            assert isinstance(detail, str) and detail and "\n" not in detail, name
            print(f"{name}: {status} {detail}")
    no_file = httpx.post(f"{server}/predict", data={"note": "no file here"}, files={"other": ("", b"")})
    assert no_file.status_code in (400, 422)
    assert httpx.post(f"{server}/predict?k=0", content=b"x").status_code == 422
    assert httpx.get(f"{server}/health").status_code == 200  # still up


def test_a_chunked_upload_over_the_limit_is_cut_off_with_413(server) -> None:
    def body():
        for _ in range(40):
            yield bytes(64_000)  # 2.5 MB in chunks, no Content-Length

    response = httpx.post(f"{server}/predict", content=body())
    assert response.status_code == 413 and "limit of 1 MB" in response.json()["detail"]


def test_32_requests_at_once_some_bad_each_gets_its_own_answer(server, shapes_model) -> None:
    """Good images are answered as they are alone, bad ones get their 4xx, and the good ones shared batches."""
    good = sorted(shapes_model.source.glob("*/*.jpg"))[::5][:24]
    bad = [data for data, _ in list(bad_uploads(shapes_model).values())[:5]] + [b"nope"] * 3
    alone = {p: httpx.post(f"{server}/predict", content=p.read_bytes()).json()["top"] for p in good}
    before = httpx.get(f"{server}/info").json()["batches_run"]
    jobs = [("good", p, p.read_bytes()) for p in good] + [("bad", None, data) for data in bad]
    jobs = jobs[::2] + jobs[1::2]  # bad ones among the good
    barrier = threading.Barrier(len(jobs))

    def send(job):
        barrier.wait()
        return job, httpx.post(f"{server}/predict", content=job[2], timeout=120)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    for (kind, path, _), response in answers:
        if kind == "good":
            assert response.status_code == 200, response.text
            top = response.json()["top"]
            assert [t["label"] for t in top] == [t["label"] for t in alone[path]]
            assert max(abs(a["prob"] - b["prob"]) for a, b in zip(top, alone[path])) < 1e-4
        else:
            assert 400 <= response.status_code < 500, response.text
    batches = httpx.get(f"{server}/info").json()["batches_run"] - before
    print(f"{len(good)} good + {len(bad)} bad requests at once: {batches} forward passes")
    assert batches < len(good)


def test_health_is_503_until_the_warm_up_inference_has_run(shapes_model) -> None:
    clf = Classifier.load(shapes_model.ckpt, "cpu")
    release = threading.Event()
    real = clf.logits

    def slow(images: torch.Tensor) -> torch.Tensor:
        release.wait(60)
        return real(images)

    clf.logits = slow
    app = create_app(clf, ServeConfig())

    async def scenario() -> tuple[int, int]:
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = (await client.get("/health")).status_code
            release.set()
            for _ in range(600):
                if (await client.get("/health")).status_code == 200:
                    return first, 200
                await asyncio.sleep(0.05)
            return first, 503

    assert asyncio.run(scenario()) == (503, 200)


def test_info_names_the_classes_preprocessing_and_checkpoint(server, shapes_model) -> None:
    info = httpx.get(f"{server}/info").json()
    assert info["classes"] == ["circle", "cross", "square", "triangle"]
    assert info["preprocessing"]["image_size"] == 64 and info["preprocessing"]["resize_shorter"] == 73
    assert len(info["checkpoint_sha256"]) == 64 and info["versions"]["torch"] == torch.__version__
    assert info["limits"]["max_upload_bytes"] == 1_000_000


@pytest.mark.real
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make test installs Debian's package when it can)")
def test_a_person_uploads_a_clothing_photo_in_chromium(clothing_model, real_data: Path, tmp_path: Path) -> None:
    """The page in headless Chromium: choose a clothing-small test image, see it, read the top-1 off the page."""
    playwright = pytest.importorskip("playwright.sync_api")
    photo = sorted((real_data / "clothing-small" / "test" / "shoes").glob("*.jpg"))[0]
    with serving(clothing_model.ckpt) as url:
        api = httpx.post(f"{url}/predict", content=photo.read_bytes()).json()["top"]
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            try:
                page = browser.new_page(viewport={"width": 800, "height": 900})
                page.goto(url + "/")
                page.wait_for_function("document.getElementById('model').textContent.includes('10 categories')")
                page.set_input_files("#file", str(photo))
                page.wait_for_selector("#results li")
                labels = page.locator("#results .label").all_inner_texts()
                probs = page.locator("#results .prob").all_inner_texts()
                shown = page.evaluate("document.getElementById('preview').naturalWidth")
                page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            finally:
                browser.close()
    print(f"page: {list(zip(labels, probs))}; screenshot {tmp_path / 'page.png'}")
    assert labels == [t["label"] for t in api] and len(labels) == 5
    assert probs[0] == f"{api[0]['prob'] * 100:.1f}%"
    assert shown > 0  # the picture itself is on the page
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_a_client_that_never_finishes_its_headers_is_cut_off(shapes_model) -> None:
    """Slowloris: half a request, then a byte now and then; the connection is closed at --header-timeout,
    and a well-behaved client is answered meanwhile and after."""
    import socket
    import time
    import urllib.parse
    import urllib.request

    with serving(shapes_model.ckpt, "--header-timeout", "1") as url:
        address = urllib.parse.urlsplit(url)
        slow = socket.create_connection((address.hostname, address.port), timeout=10)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 6:
            try:
                slow.sendall(b"X")  # a byte every 0.3 s resets uvicorn's own keep-alive timer
                if slow.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.3)
        slow.close()
        assert closed and time.monotonic() - start < 3
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            assert response.status == 200


def test_every_error_body_has_a_detail_line_and_a_reason(server) -> None:
    boundary = "XyZ"
    cases = {
        "unknown route": (httpx.get(f"{server}/nope"), 404, "not_found"),
        "wrong method": (httpx.put(f"{server}/predict", content=b"x"), 405, "method_not_allowed"),
        "k out of range": (httpx.post(f"{server}/predict?k=0", content=b"x"), 422, "bad_parameter"),
        "k not a number": (httpx.post(f"{server}/predict?k=abc", content=b"x"), 422, "bad_parameter"),
        "form without a file": (httpx.post(f"{server}/predict", content=b'--XyZ\r\nContent-Disposition: form-data; '
                                           b'name="note"\r\n\r\nx\r\n--XyZ--\r\n',
                                           headers={"content-type": f"multipart/form-data; boundary={boundary}"}),
                                400, "no_file"),
        "malformed multipart": (httpx.post(f"{server}/predict", content=b"--XyZ\r\nno headers end",
                                           headers={"content-type": f"multipart/form-data; boundary={boundary}"}),
                                400, None),
    }
    for name, (response, status, reason) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        body = response.json()
        assert isinstance(body["detail"], str) and body["detail"] and "\n" not in body["detail"], (name, body)
        assert isinstance(body["reason"], str) and body["reason"], (name, body)
        assert reason is None or body["reason"] == reason, (name, body)

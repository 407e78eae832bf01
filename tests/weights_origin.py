"""A loopback stand-in for the weights origins: http.server on 127.0.0.1 serving files under the origins'
own paths (<host>/<path>, the layout WEIGHTS_MIRROR expects), with Range support, a connection that
drops mid-file on request, and a log of every request (path, Range, bytes sent, Authorization)."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from safetensors.numpy import save as save_safetensors


@dataclass
class Request:
    path: str
    range: str | None
    status: int
    sent: int
    authorization: str | None


@dataclass
class Origin:
    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)  # URL path (/host/path) -> body
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before closing, once
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    delay_s: float = 0.0  # per response: lets parallel requests overlap
    in_flight: int = 0
    max_in_flight: int = 0

    def sent(self, path: str) -> int:
        return sum(r.sent for r in self.requests if r.path == path)


def _handler(origin: Origin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            with origin.lock:
                origin.in_flight += 1
                origin.max_in_flight = max(origin.max_in_flight, origin.in_flight)
            try:
                time.sleep(origin.delay_s)
                self._get()
            finally:
                with origin.lock:
                    origin.in_flight -= 1

        def _get(self) -> None:
            path = self.path.split("?")[0]
            body = origin.files.get(path)
            ranged = self.headers.get("Range")
            auth = self.headers.get("Authorization")
            if body is None:
                self.send_error(404)
                with origin.lock:
                    origin.requests.append(Request(path, ranged, 404, 0, auth))
                return
            start = int(re.fullmatch(r"bytes=(\d+)-", ranged).group(1)) if ranged else 0
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                with origin.lock:
                    origin.requests.append(Request(path, ranged, 416, 0, auth))
                return
            status = 206 if ranged else 200
            self.send_response(status)
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            chunk = body[start:]
            with origin.lock:
                cut = origin.drop_after.pop(path, None)
            if cut is not None:  # send part of the body, then hang up (HTTP/1.0: the socket closes)
                chunk = chunk[:cut]
            self.wfile.write(chunk)
            self.wfile.flush()
            with origin.lock:
                origin.requests.append(Request(path, ranged, status, len(chunk), auth))

    return Handler


def start_origin() -> tuple[Origin, ThreadingHTTPServer]:
    origin = Origin()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(origin))
    origin.base = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return origin, server


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def onnx_bytes(name: str) -> bytes:
    """A real (tiny) ONNX model: one Identity node."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    return helper.make_model(graph).SerializeToString()


def pth_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))}, buffer)
    return buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def real_format_files() -> dict[str, bytes]:
    """The test manifest's files in their real formats, keyed by their origin URL path."""
    rng = np.random.default_rng(0)
    members = {
        "det_10g.onnx": onnx_bytes("det"),
        "w600k_r50.onnx": onnx_bytes("rec"),
        "genderage.onnx": b"ga",
    }
    return {
        "/github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip": zip_bytes(members),
        **{f"/member/{name}": data for name, data in members.items()},  # the members, for their hashes
        "/github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth": pth_bytes(1) * 40,
        f"/huggingface.co/stabilityai/sd-vae-ft-mse/resolve/{'a' * 40}/config.json": b'{"_class_name": "x"}',
        f"/huggingface.co/stabilityai/sd-vae-ft-mse/resolve/{'a' * 40}/diffusion_pytorch_model.safetensors": (
            save_safetensors({"w": rng.standard_normal((16, 16), dtype=np.float32)})
        ),
        "/download.pytorch.org/models/alexnet-owt-7be5be79.pth": pth_bytes(2),
    }


def write_manifest(
    path: Path, files: dict[str, bytes], extra_sources: dict[str, list[str]] | None = None
) -> Path:
    """A manifest like configs/weights.yaml for `files` (real origin URLs; WEIGHTS_MIRROR points them at
    the loopback origin). `extra_sources` puts sources before an entry's origin (mirrors tried first)."""
    extra = extra_sources or {}
    zip_path = "/github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"
    pth = "/github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth"
    hf = f"/huggingface.co/stabilityai/sd-vae-ft-mse/resolve/{'a' * 40}/"
    alex = "/download.pytorch.org/models/alexnet-owt-7be5be79.pth"

    def sources(name: str, url: str) -> str:
        return "[" + ", ".join([*extra.get(name, []), url]) + "]"

    text = f"""
buffalo_l:
  kind: archive
  path: insightface/models/buffalo_l
  file: buffalo_l.zip
  sources: {sources("buffalo_l", "https:/" + zip_path)}
  sha256: {sha(files[zip_path])}
  size: {len(files[zip_path])}
  licence: insightface models, non-commercial research only
  restricted: true
  jobs: [build, swap]
scrfd_10g:
  member_of: buffalo_l
  member: det_10g.onnx
  path: insightface/models/buffalo_l/det_10g.onnx
  sha256: {sha(files["/member/det_10g.onnx"])}
  size: {len(files["/member/det_10g.onnx"])}
  jobs: [build, swap]
arcface_r50:
  member_of: buffalo_l
  member: w600k_r50.onnx
  path: insightface/models/buffalo_l/w600k_r50.onnx
  sha256: {sha(files["/member/w600k_r50.onnx"])}
  size: {len(files["/member/w600k_r50.onnx"])}
  jobs: [build, swap]
genderage:
  member_of: buffalo_l
  member: genderage.onnx
  path: insightface/models/buffalo_l/genderage.onnx
  sha256: null
  jobs: []
parsenet:
  path: facexlib/parsing_parsenet.pth
  sources: {sources("parsenet", "https:/" + pth)}
  sha256: {sha(files[pth])}
  size: {len(files[pth])}
  licence: MIT
  jobs: [build, face_mask]
sd_vae_ft_mse:
  path: vae
  sources: [{{hf: stabilityai/sd-vae-ft-mse, revision: {"a" * 40}}}]
  licence: MIT
  jobs: [train]
  files:
    - {{path: config.json}}
    - path: diffusion_pytorch_model.safetensors
      sha256: {sha(files[hf + "diffusion_pytorch_model.safetensors"])}
      size: {len(files[hf + "diffusion_pytorch_model.safetensors"])}
lpips_alexnet:
  path: torch/hub/checkpoints/alexnet-owt-7be5be79.pth
  sources: {sources("lpips_alexnet", "https:/" + alex)}
  sha256: {sha(files[alex])}
  size: {len(files[alex])}
  jobs: [eval]
"""
    path.write_text(text)
    return path


def load_onnx(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))

"""TF Serving's REST format on the exported model, and ncsn_tf.client against a local server.

`request_tensors` and `response_body` follow TF Serving's JSON rules (tensorflow_serving/util/
json_tensor.cc): the row format ("instances") stacks each input's per-instance values along a
new batch axis, the columnar format ("inputs") takes each input as one tensor; JSON values are
converted to the dtype the signature declares; string outputs whose names end in `_bytes` are
returned as {"b64": ...}. The local server answers predict requests with them through
`tf.saved_model.load`, so the client meets the same JSON a real server sends.
"""
import base64
import http.server
import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from ncsn_tf import client, serving, models
from ncsn_tf.config import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = presets.override(presets.get("digits"), ngf=4, num_scales=3, n_steps_each=1,
                          step_lr=2e-5, denoise=True)
LIMITS = serving.ServingLimits(max_batch=4)


def request_tensors(body: dict, signature) -> dict[str, tf.Tensor]:
    """The input tensors TF Serving makes of a predict request body for `signature`."""
    specs = signature.structured_input_signature[1]
    if ("instances" in body) == ("inputs" in body):
        raise ValueError("Missing 'inputs' or 'instances' key (exactly one is needed)")
    is_named = lambda v: isinstance(v, dict) and set(v) != {"b64"}  # noqa: E731
    if "instances" in body:
        rows = body["instances"]
        if not rows:
            raise ValueError("No values in 'instances' array")
        if is_named(rows[0]):
            for i, row in enumerate(rows):
                if set(row) != set(specs):
                    raise ValueError(f"instance {i} keys must be equal to: {sorted(specs)}")
            columns = {name: [row[name] for row in rows] for name in specs}
        else:
            (name,) = specs
            columns = {name: rows}
    else:
        inputs = body["inputs"]
        if is_named(inputs):
            missing = set(specs) - set(inputs)
            if missing:
                raise ValueError(f"Missing named input: {missing} in 'inputs' object.")
            columns = {name: inputs[name] for name in specs}
        else:
            (name,) = specs
            columns = {name: inputs}
    return {name: tf.constant(_unb64(value), dtype=specs[name].dtype)
            for name, value in columns.items()}


def _unb64(value):
    if isinstance(value, list):
        return [_unb64(v) for v in value]
    if isinstance(value, dict):
        return base64.b64decode(value["b64"])
    return value


def response_body(outputs: dict[str, tf.Tensor], row_format: bool) -> dict:
    """The JSON TF Serving answers with (row format: "predictions", else "outputs")."""
    def to_json(name, array):
        array = np.asarray(array, dtype=object if outputs[name].dtype == tf.string else None)
        if array.dtype == object:
            as_b64 = name.endswith("_bytes")
            flat = [{"b64": base64.b64encode(b).decode()} if as_b64 else b.decode()
                    for b in array.reshape(-1)]
            return np.array(flat, dtype=object).reshape(array.shape).tolist()
        return array.tolist()

    arrays = {name: t.numpy() for name, t in outputs.items()}
    if row_format:
        batch = {len(a) for a in arrays.values()}
        assert len(batch) == 1, "all outputs need the same batch size in the row format"
        rows = [{name: to_json(name, a[i]) for name, a in arrays.items()}
                for i in range(batch.pop())]
        if len(arrays) == 1:
            rows = [next(iter(row.values())) for row in rows]
        return {"predictions": rows}
    columns = {name: to_json(name, a) for name, a in arrays.items()}
    return {"outputs": columns if len(columns) > 1 else next(iter(columns.values()))}


def serve(model, body: dict) -> dict:
    """One predict request through JSON both ways, as over HTTP."""
    body = json.loads(json.dumps(body))
    fn = model.signatures[body.get("signature_name", "serving_default")]
    outputs = fn(**request_tensors(body, fn))
    return json.loads(json.dumps(response_body(outputs, "instances" in body)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    keras.utils.set_random_seed(0)
    net = models.build(CONFIG)
    path = serving.export(net, CONFIG, 5, str(tmp_path_factory.mktemp("models")), "ncsn",
                         limits=LIMITS)
    return tf.saved_model.load(path)


def _decode(png_b64: dict) -> np.ndarray:
    return tf.io.decode_png(base64.b64decode(png_b64["b64"])).numpy()


def test_row_and_columnar_requests(model):
    rows = serve(model, {"instances": [{"seed": 1}, {"seed": 2}]})["predictions"]
    columns = serve(model, {"signature_name": "serving_default",
                            "inputs": {"seed": [1, 2]}})["outputs"]
    assert len(rows) == 2 and set(rows[0]) == {"images", "png_bytes"}
    images = np.array(columns["images"])
    assert images.shape == (2, 16, 16, 1) and images.min() >= 0 and images.max() <= 255
    for i in range(2):
        np.testing.assert_array_equal(np.array(rows[i]["images"]), images[i])
        np.testing.assert_array_equal(_decode(rows[i]["png_bytes"]), images[i])
        np.testing.assert_array_equal(_decode(columns["png_bytes"][i]), images[i])
    # A bare list of instances works too, as the signature has a single input.
    bare = serve(model, {"instances": [2]})["predictions"]
    np.testing.assert_array_equal(np.array(bare[0]["images"]), images[1])


def test_sample_with_settings_takes_columnar_scalars(model):
    body = {"signature_name": "sample_with_settings",
            "inputs": {"seed": [3], "n_steps_each": 1, "step_lr": 2e-5, "denoise": True}}
    out = serve(model, body)["outputs"]
    default = serve(model, {"inputs": {"seed": [3]}})["outputs"]
    assert out["images"] == default["images"]
    body["inputs"].update(n_steps_each=2, denoise=False)
    assert serve(model, body)["outputs"]["images"] != default["images"]


def test_inpaint_and_score_requests(model):
    image = np.round(np.random.default_rng(0).uniform(size=(1, 16, 16, 1)) * 255) / 255
    mask = np.zeros((1, 16, 16, 1))
    mask[:, 4:12] = 1
    out = serve(model, {"signature_name": "inpaint", "instances": [
        {"image": image[0].tolist(), "mask": mask[0].tolist(), "seed": 9}]})["predictions"]
    completed = np.array(out[0]["images"])
    np.testing.assert_array_equal(completed[4:12], np.round(image[0, 4:12] * 255))
    score = serve(model, {"signature_name": "score",
                          "inputs": {"x": image.tolist(), "noise_level": [2]}})["outputs"]
    assert np.array(score).shape == (1, 16, 16, 1)


class _Handler(http.server.BaseHTTPRequestHandler):
    """POST /v1/models/NAME[/versions/N]:predict, answered like TF Serving."""

    def do_POST(self):
        match = re.fullmatch(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:predict", self.path)
        name = match and match[1]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if name == "slow":
            time.sleep(2)
        if name not in self.server.models:
            return self._reply(404, {"error": f"Servable not found for request: Latest({name})"})
        try:
            self._reply(200, serve(self.server.models[name], json.loads(body)))
        except tf.errors.InvalidArgumentError as e:
            self._reply(400, {"error": e.message})
        except (ValueError, KeyError, TypeError) as e:
            self._reply(400, {"error": str(e)})

    def _reply(self, code, payload):
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout test)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(model):
    """A local REST server; it shuts itself down after 5 minutes if the test hangs."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.models = {"ncsn": model}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    watchdog = threading.Timer(300, httpd.shutdown)
    watchdog.daemon = True
    watchdog.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    watchdog.cancel()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.mark.parametrize("names", [("--model_name", "--seeds_per_request"),
                                   ("--model", "--batch_size")])  # the deprecated spellings
def test_client_cli_writes_a_grid(model, server, tmp_path, names, caplog):
    fv = flags.FlagValues()
    client.define_flags(fv)
    out = tmp_path / "grid.png"
    argv = fv(["client", f"--host={server}", f"{names[0]}=ncsn", "--num_samples=4", "--seed=10",
               f"{names[1]}=3", f"--out={out}"])
    with caplog.at_level("WARNING"):
        client.main(argv, fv)
    deprecated = names[0] == "--model"
    assert ("--model is deprecated; it is --model_name now" in caplog.text) == deprecated
    assert ("--batch_size is deprecated" in caplog.text) == deprecated
    grid = tf.io.decode_png(tf.io.read_file(str(out))).numpy()
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 1)  # 2x2 cells of 16 px shown at 64, 2 px padding
    images = model.signatures["serving_default"](
        seed=tf.constant([10, 11, 12, 13], tf.int64))["images"].numpy()
    for i, image in enumerate(images):
        r, c = divmod(i, 2)
        np.testing.assert_array_equal(
            grid[2 + 66 * r:66 + 66 * r:4, 2 + 66 * c:66 + 66 * c:4], image)


def test_client_shows_the_served_settings(server, capsys):
    settings = client.sampler_settings(server, "ncsn")
    assert settings["sampler"]["n_steps_each"] == CONFIG.sampling.n_steps_each
    assert settings["sampler"]["step_lr"] == pytest.approx(CONFIG.sampling.step_lr)
    assert settings["bounds"]["max_batch"] == LIMITS.max_batch and settings["step"] == 5
    fv = flags.FlagValues()
    client.define_flags(fv)
    client.main(fv(["client", f"--host={server}", "--model_name=ncsn", "--show_settings"]), fv)
    assert json.loads(capsys.readouterr().out) == settings


def test_client_with_settings(server):
    settings = {"n_steps_each": 2, "step_lr": 1e-5, "denoise": False}
    pngs = client.sample_pngs(server, "ncsn", [1, 2], settings=settings)
    assert [tf.io.decode_png(p).shape for p in pngs] == [(16, 16, 1)] * 2


def test_client_reports_serving_errors(server):
    with pytest.raises(client.ServingError,
                       match=r"(?s)HTTP 400: .*seed must be a list of 1 to 4 seeds"):
        client.sample_pngs(server, "ncsn", range(5))
    with pytest.raises(client.ServingError, match=r"HTTP 404: Servable not found"):
        client.sample_pngs(server, "nonexistent", [1])
    with pytest.raises(client.ServingError, match="did not answer within 0.5 s"):
        client.sample_pngs(server, "slow", [1], timeout=0.5)


def test_client_reports_connection_refused():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(client.ServingError, match="Cannot connect to TF Serving .*refused"):
        client.sample_pngs(f"127.0.0.1:{port}", "ncsn", [1], timeout=5)


def test_client_cli_errors_are_one_line(tmp_path):
    fv = flags.FlagValues()
    client.define_flags(fv)
    argv = fv(["client", "--host=127.0.0.1:9", "--n_steps_each=2", f"--out={tmp_path}/g.png"])
    with pytest.raises(SystemExit, match="client: .*go together"):
        client.main(argv, fv)


_PNG = base64.b64encode(tf.io.encode_png(np.zeros((4, 4, 1), np.uint8)).numpy()).decode()


def _ok(outputs) -> bytes:
    body = json.dumps({"outputs": {"png_bytes": outputs}}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


# What a broken server, proxy or network answers, by model name.
_BROKEN = {
    "not_utf8": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\xff\xfe\x00{",
    "bad_base64": _ok([{"b64": "@@not base64@@"}, {"b64": _PNG}]),
    "not_png": _ok([{"b64": base64.b64encode(b"GIF89a....").decode()}, {"b64": _PNG}]),
    "no_images": _ok([]),
    "damaged_png": _ok([{"b64": _PNG}, {"b64": base64.b64encode(b"\x89PNG\r\n\x1a\n!").decode()}]),
    "fewer_images": _ok([{"b64": _PNG}]),
    "short_body": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"outputs\": ",
    "closed": b"",
    "redirect": (b"HTTP/1.1 302 Found\r\nLocation: /v1/models/moved:predict\r\n"
                 b"Content-Length: 0\r\n\r\n"),
    "redirect_post": (b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://elsewhere:8501/\r\n"
                      b"Content-Length: 0\r\n\r\n"),
}


class _BrokenHandler(socketserver.BaseRequestHandler):
    def handle(self):
        request = self.request.recv(65536).decode("latin-1")
        name = re.search(r"/v1/models/([^/:]+)", request)[1]
        if name == "drip":  # a whole answer, one byte every 0.3 s
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
            for _ in range(50):
                time.sleep(0.3)
                try:
                    self.request.sendall(b" ")
                except OSError:
                    return
        elif name == "moved":
            self.request.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 17\r\n\r\n"
                                 b'{"error": "gone"}')
        else:
            self.request.sendall(_BROKEN[name])


@pytest.fixture(scope="module")
def broken_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _BrokenHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name, message", [
    ("not_utf8", "answered with bytes that are not UTF-8 text"),
    ("bad_base64", "answered with an image that is not valid base64"),
    ("not_png", r"answered image 0 \(seed 7\) that is not a PNG \(it starts with b'GIF89a"),
    ("no_images", "answered 0 images for 2 seeds"),
    ("fewer_images", "answered 1 images for 2 seeds"),
    ("short_body", "closed the connection before a whole answer"),
    ("closed", "closed the connection before a whole answer"),
    ("redirect", r"/v1/models/moved:predict \(redirected from .*/v1/models/redirect:predict\) "
                 "answered HTTP 404: gone"),
    ("redirect_post", "answered HTTP 307, a redirect to http://elsewhere:8501/, which a predict "
                      r"request \(POST\) does not follow"),
])
def test_broken_answers_are_one_clear_error(broken_server, name, message):
    with pytest.raises(client.ServingError, match=message):
        client.sample_pngs(broken_server, name, [7, 8], timeout=10)


def test_client_cli_writes_without_tensorflow_and_names_a_damaged_image(broken_server, tmp_path):
    script = (
        "import sys\n"
        "from absl import flags\n"
        "from ncsn_tf import client\n"
        "fv = flags.FlagValues()\n"
        "client.define_flags(fv)\n"
        "for model, n in (('fewer_images', 1), ('damaged_png', 2)):\n"
        f"    argv = fv(['client', '--host={broken_server}', '--model_name=' + model, "
        f"'--num_samples=' + str(n), '--out={tmp_path}/one.png'])\n"
        "    try:\n"
        "        client.main(argv, fv)\n"
        "    except SystemExit as e:\n"
        "        print(e)\n"
        "print('tensorflow loaded:', 'tensorflow' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    lines = done.stdout.splitlines()
    assert lines[0] == f"Wrote {tmp_path}/one.png (1 image, seeds 0 to 0)", done.stderr[-2000:]
    assert lines[1] == ("client: the image of seed 1 is a damaged PNG (no header or no image "
                        "data)")
    assert lines[2] == "tensorflow loaded: False"
    np.testing.assert_array_equal(tf.io.decode_png(tf.io.read_file(f"{tmp_path}/one.png")),
                                  np.zeros((64 + 4, 64 + 4, 1), np.uint8))


def test_timeout_bounds_the_whole_answer_not_each_read(broken_server):
    start = time.monotonic()
    with pytest.raises(client.ServingError, match="did not answer within 1 s"):
        client.sample_pngs(broken_server, "drip", [1], timeout=1)
    assert time.monotonic() - start < 3
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"timeout must be > 0 seconds, got {bad}"):
            client.sample_pngs(broken_server, "drip", [1], timeout=bad)

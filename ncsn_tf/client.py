r"""A TF Serving REST client for exported models: `python -m ncsn_tf.client`.

    python -m ncsn_tf.client --host=localhost:8501 --model=ncsn --num_samples=4 --seed=0 \
        --out=grid.png

Sends predict requests in the columnar format, `{"signature_name": ..., "inputs": {"seed":
[...]}}`, to `http://HOST/v1/models/MODEL[/versions/V]:predict` (urllib, no other HTTP
library), decodes the base64 PNGs that TF Serving returns for the `png_bytes` output and writes
them as one grid (NumPy and the standard library: TensorFlow is not loaded). With
`--n_steps_each`, `--step_lr` and `--denoise` it calls the `sample_with_settings` signature
instead of `serving_default`; `--show_settings` prints the ones the model serves.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import json
import socket
import sys
import threading
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np
from absl import app, flags

from ncsn_tf import cli
from ncsn_tf import png as png_io


class ServingError(RuntimeError):
    """TF Serving could not be reached or refused the request; the message says why."""


def model_url(host: str, model: str, version: int | None = None) -> str:
    """The predict URL; `host` is HOST:PORT or a full http(s):// address."""
    base = host.rstrip("/") if "://" in host else f"http://{host.rstrip('/')}"
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version is not None else "")
    return f"{base}{path}:predict"


def predict(host: str, model: str, body: dict[str, Any], *, version: int | None = None,
            timeout: float = 600.0) -> dict[str, Any]:
    """POSTs a predict request body and returns the decoded JSON response. `timeout` bounds
    the whole exchange (connecting, waiting and reading), not each read."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout:g}")
    url = model_url(host, model, version)
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=_exchange, args=(url, body, timeout, outcome), daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():  # the thread is a daemon: it ends with the program
        raise ServingError(f"{url} did not answer within {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["response"]


def _exchange(url: str, body: dict[str, Any], timeout: float, outcome: dict[str, Any]) -> None:
    """One request and its whole response; stores "response" or a ServingError as "error"."""
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answered = response.geturl()
            where = url if answered == url else f"{url} (redirected to {answered})"
            raw = response.read()
        outcome["response"] = json.loads(raw.decode("utf-8"))
    except urllib.error.HTTPError as e:
        where = url if e.geturl() in (None, url) else f"{e.geturl()} (redirected from {url})"
        if 300 <= e.code < 400:
            outcome["error"] = ServingError(
                f"{where} answered HTTP {e.code}, a redirect to {e.headers.get('Location')}, "
                "which a predict request (POST) does not follow: pass that address as --host")
        else:
            outcome["error"] = ServingError(
                f"{where} answered HTTP {e.code}: {_error_message(e)}")
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            outcome["error"] = ServingError(f"{url} did not answer within {timeout:g} s")
        else:
            outcome["error"] = ServingError(
                f"Cannot connect to TF Serving at {url}: {e.reason}. Is tensorflow_model_server "
                "running and serving REST on that port (--rest_api_port; 8501 in the "
                "tensorflow/serving Docker image)?")
    except (TimeoutError, socket.timeout):
        outcome["error"] = ServingError(f"{url} did not answer within {timeout:g} s")
    except (http.client.HTTPException, ConnectionError) as e:  # cut short, closed, reset
        outcome["error"] = ServingError(f"{url} closed the connection before a whole answer "
                                        f"({type(e).__name__}: {e}); is a proxy or the "
                                        "server's own limit cutting long requests?")
    except UnicodeDecodeError as e:
        outcome["error"] = ServingError(f"{where} answered with bytes that are not UTF-8 text "
                                        f"(at byte {e.start}), not TF Serving's JSON")
    except json.JSONDecodeError as e:
        outcome["error"] = ServingError(f"{where} answered with something that is not JSON: "
                                        f"{e}")


def _error_message(error: urllib.error.HTTPError) -> str:
    """TF Serving's `{"error": "..."}` message, or the raw body."""
    text = error.read().decode("utf-8", errors="replace")
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text.strip() or error.reason


def sampler_settings(host: str, model: str, *, version: int | None = None,
                     timeout: float = 60.0) -> dict[str, Any]:
    """What the model's `serving_default` does (sampler, NFE, settings, bounds, training step),
    from its `sampler_settings` signature."""
    response = predict(host, model, {"signature_name": "sampler_settings",
                                     "inputs": {"seed": [0]}}, version=version, timeout=timeout)
    try:
        return json.loads(response["outputs"])
    except (KeyError, TypeError, ValueError) as e:
        raise ServingError(f"Unexpected response from {model_url(host, model, version)}: no "
                           f"JSON 'sampler_settings' ({e!r}). Was the model exported by "
                           "ncsn_tf.export? Exports older than this signature lack it: export "
                           "again.") from None


def sample_pngs(host: str, model: str, seeds: Sequence[int], *,
                settings: dict[str, Any] | None = None, version: int | None = None,
                timeout: float = 600.0) -> list[bytes]:
    """One PNG-encoded sample per seed. `settings` (n_steps_each, step_lr, denoise, all three)
    select the `sample_with_settings` signature."""
    inputs: dict[str, Any] = {"seed": [int(s) for s in seeds]}
    signature = "serving_default"
    if settings:
        inputs.update(settings)
        signature = "sample_with_settings"
    response = predict(host, model, {"signature_name": signature, "inputs": inputs},
                       version=version, timeout=timeout)
    url = model_url(host, model, version)
    try:
        encoded = response["outputs"]["png_bytes"]
        pngs = [base64.b64decode(item["b64"], validate=True) for item in encoded]
    except (KeyError, TypeError) as e:
        raise ServingError(f"Unexpected response from {url}: no base64 'png_bytes' output "
                           f"({e!r}). Was the model exported by ncsn_tf.export?") from None
    except (binascii.Error, ValueError) as e:
        raise ServingError(f"{url} answered with an image that is not valid base64 ({e})"
                           ) from None
    if len(pngs) != len(seeds):
        raise ServingError(f"{url} answered {len(pngs)} images for {len(seeds)} seeds")
    for i, png in enumerate(pngs):
        if not png.startswith(png_io.SIGNATURE):
            raise ServingError(f"{url} answered image {i} (seed {seeds[i]}) that is not a PNG "
                               f"(it starts with {png[:8]!r})")
    return pngs


# Old spelling -> flag (one name per concept across the CLIs): accepted for one release.
DEPRECATED_FLAGS = {"model": "model_name", "batch_size": "seeds_per_request"}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines this CLI's flags on `flag_values`."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("host", "localhost:8501", "TF Serving REST address, HOST:PORT or an "
                        "http(s):// URL.", **fv)
    flags.DEFINE_string("model_name", "ncsn", "Model name (its directory under the base path, "
                        "as export's --model_name).", **fv)
    flags.DEFINE_integer("version", None, "Model version; default: the one TF Serving serves.",
                         **fv)
    flags.DEFINE_integer("num_samples", 4, "Number of images.", **fv)
    flags.DEFINE_integer("seed", 0, "Image i uses seed --seed + i.", **fv)
    flags.DEFINE_integer("seeds_per_request", 16, "Seeds (images) per request, at most the "
                         "export's --max_batch.", **fv)
    flags.DEFINE_string("out", "grid.png", "PNG grid to write.", **fv)
    flags.DEFINE_integer("n_steps_each", None, "Langevin steps per noise level (with "
                         "--step_lr and --denoise: uses sample_with_settings).", **fv)
    flags.DEFINE_float("step_lr", None, "Langevin step size (see --n_steps_each).", **fv)
    flags.DEFINE_boolean("denoise", None, "Final denoising step (see --n_steps_each).", **fv)
    flags.DEFINE_boolean("show_settings", False, "Print what the model's serving_default does "
                         "(sampler, NFE, n_steps_each, step_lr, bounds, training step) as JSON "
                         "and exit: the numbers to start from for --n_steps_each/--step_lr.",
                         **fv)
    flags.DEFINE_float("timeout", 600.0, "Seconds a request may take in all (connecting, "
                       "sampling and reading the answer); > 0.", **fv)
    cli.define_deprecated_aliases(DEPRECATED_FLAGS, flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    f = flag_values
    try:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
        cli.warn_deprecated(DEPRECATED_FLAGS, f)
        if f.num_samples < 1 or f.seeds_per_request < 1:
            raise app.UsageError("--num_samples and --seeds_per_request must be >= 1")
        if not f.timeout > 0:
            raise app.UsageError(f"--timeout={f.timeout:g} must be > 0 seconds")
        settings = {"n_steps_each": f.n_steps_each, "step_lr": f.step_lr,
                    "denoise": f.denoise}
        given = [k for k, v in settings.items() if v is not None]
        if given and len(given) < len(settings):
            raise app.UsageError("--n_steps_each, --step_lr and --denoise go together "
                                 "(sample_with_settings needs all three); got only "
                                 + ", ".join(f"--{k}" for k in given))
        if f.show_settings:
            print(json.dumps(sampler_settings(f.host, f.model_name, version=f.version,
                                              timeout=f.timeout), indent=2))
            return
        seeds = list(range(f.seed, f.seed + f.num_samples))
        pngs = []
        for start in range(0, len(seeds), f.seeds_per_request):
            pngs += sample_pngs(f.host, f.model_name, seeds[start:start + f.seeds_per_request],
                                settings=settings if given else None, version=f.version,
                                timeout=f.timeout)
        _write_grid(pngs, seeds, f.out)
    except (app.UsageError, ServingError) as e:
        sys.exit(f"client: {e}")
    print(f"Wrote {f.out} ({len(pngs)} image{'s' * (len(pngs) != 1)}, seeds {seeds[0]} to "
          f"{seeds[-1]})")


def _write_grid(pngs: list[bytes], seeds: list[int], path: str) -> None:
    images = []
    for seed, png in zip(seeds, pngs):
        try:
            images.append(png_io.decode(png))
        except ValueError as e:
            raise ServingError(f"the image of seed {seed} is {e}") from None
    try:
        with open(path, "wb") as f:
            f.write(png_io.encode(png_io.grid(np.stack(images))))
    except OSError as e:
        raise ServingError(f"cannot write {path}: {e.strerror}") from None


if __name__ == "__main__":
    define_flags()
    cli.run(main)

"""The sampling driver shared by every sampler: seeds, chunks, inpainting masks, interpolation,
trajectories and diagnostics, around an update rule that a subclass supplies.

A sampler is a `Sampler` subclass (ald.py, cas.py, pc.py, heun.py, dpm.py) that says how many
noise levels it walks, how many steps each level takes, the σ of a level, the initial state,
one update step and the final step, each a short function of its own settings. Every run is
one `tf.function` whose loop over levels and steps is a `tf.while_loop` in the graph, so a
whole sampler exports as a single TF Serving signature.

Randomness comes only from integer seeds, one per image: the noise of image n at step t is
`stateless_normal(seed=(seeds[n], counter(t)))` (to the last bit of log/sin/cos), drawn for
the whole batch at once by `philox` (a constant number of batched ops per step, whatever the
batch size). The same seed and settings therefore give bit-identical images, whatever else
shares the batch, and a run split into chunks of levels (`init` → `run_levels` … → `finish`,
e.g. behind a progress bar) is bit-identical to the one-graph `sample`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import tensorflow as tf

from ncsn_tf.sampling import philox

# score_fn(x, labels) with int32 level indices, or score_fn(x, sigma) with float σ, per example.
ScoreFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

# Independent random streams per seed: a draw for Langevin step t of stream k uses the
# stateless seed (seed, t * _NUM_STREAMS + k). The initial state uses step 0 of INIT.
_LANGEVIN, _KNOWN, INIT = 0, 1, 2
_NUM_STREAMS = 3

_MASK_SHAPES = ("mask must have the image's height and width, and 1 or the image's batch size "
                "and channels: [H, W, C], [H, W, 1], [N, H, W, C] or [N, H, W, 1]")

DIAGNOSTICS = ("level", "step_size", "grad_norm", "image_norm", "snr", "grad_mean_norm")


class Sampler:
    """The driver: runs a subclass's update rule over seeds, chunks, masks and interpolations.

    `shape` is the shape of one example, e.g. (32, 32, 3). At the end an optional final step
    (`denoise`, the rule's) and, for images, clipping to [0, 1] (`clip=False` for unbounded
    data). `sample`, `run_levels`, `inpaint` and `interpolate` return a dict: "samples" and,
    when asked for at construction, "trajectory" (x after every `trajectory_every`-th global
    step, [frames, N, ...]) and "diagnostics" (per step: see `DIAGNOSTICS`). Each method traces
    one graph for all batch sizes; it runs without XLA (as TF Serving needs) unless
    `jit_compile=True` (same draws; XLA cannot record a trajectory).

    Subclasses set `name` and override the hooks below. A rule whose settings may change per
    call (ald's T and ε, for TF Serving's `sample_with_settings`) names them in
    `call_settings` (name -> dtype); the public methods then take them as keyword arguments,
    defaulting to the attributes of the same names, and the driver passes them on as tensors
    to `_steps_per_level` and `_update`. Other rules take no settings per call.
    """

    name = ""
    call_settings: dict[str, tf.DType] = {}

    @classmethod
    def stochastic_with(cls, settings) -> bool:
        """Whether the rule with these `SamplingConfig` settings draws noise after its first
        step, as inpainting (the known pixels are re-noised to the level's σ every step) and
        interpolation (chains blend the noise of two seeds) need."""
        return True

    def __init__(self, score_fn, sigmas, shape: Sequence[int], *, denoise: bool = True,
                 clip: bool = True, trajectory_every: int = 0, diagnostics: bool = False,
                 jit_compile: bool = False):
        if trajectory_every < 0:
            raise ValueError(f"trajectory_every must be >= 0 (0 = off), got {trajectory_every}")
        if trajectory_every and jit_compile:
            raise ValueError("trajectory_every needs jit_compile=False: XLA cannot build the "
                             "trajectory's variable-length frame list")
        if len(sigmas.shape) != 1 or sigmas.shape[0] is None or sigmas.shape[0] < 1:
            raise ValueError(f"sigmas must be a non-empty vector, got shape {sigmas.shape}")
        self.score_fn = score_fn
        self.sigmas = sigmas
        self.shape = tuple(int(d) for d in shape)
        self.denoise = denoise
        self.clip = clip
        self.trajectory_every = trajectory_every
        self.diagnostics = diagnostics
        self.jit_compile = jit_compile
        self._functions = {}

    @property
    def stochastic(self) -> bool:
        """`stochastic_with` this sampler's settings: it can inpaint and interpolate."""
        return True

    # ---- the update rule: what a subclass defines ----

    @property
    def num_levels(self) -> int:
        """Noise levels walked (the unit of chunks and progress)."""
        return int(self.sigmas.shape[0])

    def nfe(self) -> int:
        """Score evaluations per image with the construction's settings."""
        raise NotImplementedError

    @property
    def steps_per_level(self) -> int:
        """Update steps per noise level with the construction's settings (T for ald,
        corrector steps + 1 for pc, 1 for the others): step numbers of diagnostics and
        trajectories count these."""
        return int(self._steps_per_level(**{k: getattr(self, k) for k in self.call_settings}))

    def _steps_per_level(self, **settings):
        """Update steps per level, given the `call_settings` (scalar tensors in a graph)."""
        return 1

    def _check_settings(self, **settings) -> dict:
        """The `call_settings` of a call, with in-graph checks of their values."""
        return settings

    def _level_sigma(self, level):
        """σ of the noise x carries at `level` (float32 scalar tensor)."""
        return self._sigmas()[level]

    def _prior(self, seeds):
        """The initial state without data: U[0, 1]^D + σ_1·z, whose noise level is σ_1."""
        return (per_seed(philox.uniform, seeds, INIT, self.shape)
                + self._level_sigma(0) * per_seed(philox.normal, seeds, INIT,
                                                   self.shape, step=1))

    def _update(self, x, level, substep, z, **settings):
        """Step `substep` at `level`, `z` ~ N(0, I) its noise, given the `call_settings`:
        (new x, score used, step size; the last two for diagnostics)."""
        raise NotImplementedError

    # A multistep rule sets `uses_memory` and overrides `_step`: the driver then carries a
    # tensor shaped like x (e.g. the previous step's denoised image) from step to step and
    # from one `run_levels` chunk to the next.
    uses_memory = False

    def _step(self, x, level, substep, z, memory, **settings):
        """`_update` for rules without memory: (new x, score, step size, memory)."""
        return (*self._update(x, level, substep, z, **settings), memory)

    def _final(self, x):
        """The final step when `denoise` (default: none)."""
        return x

    # ---- public API: converts the arguments and calls a graph function ----

    def sample(self, seeds, data=None, **settings) -> dict:
        """One example per seed, from U[0,1]^D or, given `data` [N, ...], from data + σ1·z."""
        return self._call(self._sample_fn, _seeds(seeds), _optional(data),
                          *self._settings(settings))

    def init(self, seeds, data=None) -> tf.Tensor:
        """The initial state of `sample` (first part of a chunked run)."""
        return self._call(self._init_fn, _seeds(seeds), _optional(data))

    def run_levels(self, x, seeds, start_level, end_level, *, image=None, mask=None,
                   memory=None, **settings) -> dict:
        """Update steps of noise levels [start_level, end_level) from state `x`.

        A chunked run `x = init(seeds)`; `x = run_levels(x, seeds, a, b)["samples"]` over
        consecutive ranges covering [0, num_levels); `finish(x)` gives exactly `sample(seeds)`.
        With `image` and `mask` it continues an inpainting run (start from `init(seeds)` too).
        A multistep sampler (`uses_memory`) also returns "memory": pass it to the next chunk.
        """
        return self._call(self._run_levels_fn, tf.convert_to_tensor(x, tf.float32),
                          _seeds(seeds), tf.convert_to_tensor(start_level, tf.int32),
                          tf.convert_to_tensor(end_level, tf.int32), *_image_and_mask(image, mask),
                          _optional(memory), *self._settings(settings))

    def finish(self, x, *, image=None, mask=None) -> tf.Tensor:
        """Last part of a chunked run: denoise, put known pixels back (inpainting), clip."""
        return self._call(self._finish_fn, tf.convert_to_tensor(x, tf.float32),
                          *_image_and_mask(image, mask))

    def inpaint(self, image, mask, seeds, **settings) -> dict:
        """Fill the pixels where `mask` is 0, keeping those where it is 1 (samplers with
        `stochastic`).

        `image` [N, H, W, C] in [0, 1]; `mask` of 0/1 with shape [N, H, W, C] or one that
        broadcasts to it ([H, W, C], [H, W, 1], [N, H, W, 1], ...); one seed per image. At every
        step the known pixels are set to image + σ_i·z; at the end they are restored exactly.
        """
        return self._call(self._inpaint_fn, *_image_and_mask(image, mask), _seeds(seeds),
                          *self._settings(settings))

    def interpolate(self, seeds_a, seeds_b, n_interpolations: int, data=None,
                    **settings) -> dict:
        """Rows of `n_interpolations` samples that blend the noise of two seeds.

        Row n starts every chain from the initial state of seeds_a[n]; at each step chain k uses
        the noise cos(θ_k)·z_a + sin(θ_k)·z_b with θ_k evenly spaced in [0, π/2], so it stays
        N(0, I) and chain 0 is exactly `sample(seeds_a)`. "samples" is [N, n_interpolations, ...].
        """
        if not self.stochastic:
            raise ValueError(f"the {self.name} sampler cannot interpolate with these "
                             "settings: its chains do not follow the per-level noise that "
                             "interpolation blends; use ald, cas, pc or dpm with eta > 0")
        if n_interpolations < 2:
            raise ValueError(f"n_interpolations must be >= 2, got {n_interpolations}")
        return self._call(functools.partial(self._interpolate_fn, n_interpolations),
                          _seeds(seeds_a), _seeds(seeds_b), _optional(data),
                          *self._settings(settings))

    # ---- graph functions ----

    def _call(self, fn, *args):
        """`fn(*args)` as a tf.function traced once for every batch size (args: tensors or None).

        One trace per batch size would cost a retrace of the whole sampler each time, and lets
        Grappler rewrite the arithmetic differently for different batch sizes, so an example's
        result would depend (in the last bits) on how many others share its batch.
        """
        specs = tuple(None if a is None else tf.TensorSpec([None, *a.shape[1:]][:a.shape.rank],
                                                           a.dtype) for a in args)
        key = (getattr(fn, "func", fn).__name__, getattr(fn, "args", ()), specs)
        if key not in self._functions:
            def graph_fn(*tensors):
                given = iter(tensors)
                return fn(*(None if spec is None else next(given) for spec in specs))
            self._functions[key] = tf.function(
                graph_fn, input_signature=[spec for spec in specs if spec is not None],
                jit_compile=self.jit_compile)
        return self._functions[key](*(a for a in args if a is not None))

    def _settings(self, overrides: dict) -> tuple:
        """The `call_settings` of a call as tensors, in their declared order: `overrides`
        (None keeps the construction's value) over the sampler's attributes."""
        unknown = set(overrides) - set(self.call_settings)
        if unknown:
            raise TypeError(f"the {self.name} sampler takes no per-call setting "
                            f"{', '.join(sorted(unknown))} (it has: "
                            f"{', '.join(self.call_settings) or 'none'})")
        return tuple(tf.convert_to_tensor(
            getattr(self, k) if overrides.get(k) is None else overrides[k], dtype)
            for k, dtype in self.call_settings.items())

    def _named(self, settings: tuple) -> dict:
        return self._check_settings(**dict(zip(self.call_settings, settings)))

    def _init_fn(self, seeds, data):
        seeds = _check_seeds(seeds)
        if data is None:
            return self._prior(seeds)
        data = self._check_examples(data, seeds, "data")
        return data + self._level_sigma(0) * per_seed(philox.normal, seeds,
                                                        INIT, self.shape)

    def _finish_fn(self, x, image, mask):
        if self.denoise:
            x = self._final(x)
        if mask is not None:
            x = tf.where(_check_mask(image, mask) > 0.5, image, x)
        return tf.clip_by_value(x, 0.0, 1.0) if self.clip else x

    def _sample_fn(self, seeds, data, *settings):
        x = self._init_fn(seeds, data)
        out = self._run_levels_fn(x, seeds, 0, self.num_levels, None, None, None, *settings)
        out["samples"] = self._finish_fn(out["samples"], None, None)
        out.pop("memory", None)
        return out

    def _run_levels_fn(self, x, seeds, start_level, end_level, image, mask, memory,
                       *settings):
        seeds = _check_seeds(seeds)
        x = self._check_examples(x, seeds, "x")
        levels_ok = (0 <= start_level) & (start_level <= end_level) & (
            end_level <= self.num_levels)
        start_level = checked(start_level, tf.debugging.Assert(levels_ok, [
            f"need 0 <= start_level <= end_level <= num_levels = {self.num_levels}, got",
            start_level, end_level]))

        def draw(step):
            return per_seed(philox.normal, seeds, _LANGEVIN, self.shape, step)

        set_known = None
        if mask is not None:
            if not self.stochastic:
                raise ValueError(f"the {self.name} sampler cannot inpaint with these "
                                 "settings: inpainting re-noises the known pixels at every "
                                 "level, which only ald, cas, pc and dpm with eta > 0 follow")
            image = self._check_examples(image, seeds, "image")
            set_known = functools.partial(_set_known, image, _check_mask(image, mask) > 0.5,
                                          seeds, self.shape)
        if self.uses_memory and memory is None:
            memory = checked(tf.zeros_like(x), tf.debugging.Assert(start_level == 0, [
                f"the {self.name} sampler is multistep: continue a run from level",
                start_level, "with the memory that the previous run_levels returned"]))
        elif self.uses_memory:
            memory = self._check_examples(memory, seeds, "memory")
        return self._anneal(x, start_level, end_level, self._named(settings), draw, set_known,
                            memory if self.uses_memory else None)

    def _inpaint_fn(self, image, mask, seeds, *settings):
        x = self._init_fn(seeds, None)
        out = self._run_levels_fn(x, seeds, 0, self.num_levels, image, mask, None, *settings)
        out["samples"] = self._finish_fn(out["samples"], image, mask)
        out.pop("memory", None)
        return out

    def _interpolate_fn(self, n_interpolations, seeds_a, seeds_b, data, *settings):
        seeds_b = checked(seeds_b, tf.debugging.assert_equal(
            tf.size(seeds_a), tf.size(seeds_b),
            message="seeds_a and seeds_b must have the same length"))
        k = n_interpolations
        angles = tf.linspace(0.0, math.pi / 2, k)
        weights_a = tf.reshape(tf.cos(angles), [1, k] + [1] * len(self.shape))
        weights_b = tf.reshape(tf.sin(angles), [1, k] + [1] * len(self.shape))
        rows = lambda t: tf.reshape(t, tf.concat([[-1, k], tf.shape(t)[1:]], 0))  # noqa: E731
        flat = lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))  # noqa: E731

        def draw(step):
            z_a = per_seed(philox.normal, seeds_a, _LANGEVIN, self.shape, step)
            z_b = per_seed(philox.normal, seeds_b, _LANGEVIN, self.shape, step)
            return flat(z_a[:, None] * weights_a + z_b[:, None] * weights_b)

        x = tf.repeat(self._init_fn(seeds_a, data), k, axis=0)
        memory = tf.zeros_like(x) if self.uses_memory else None
        out = self._anneal(x, 0, self.num_levels, self._named(settings), draw, None, memory)
        out.pop("memory", None)
        out["samples"] = rows(self._finish_fn(out["samples"], None, None))
        if "trajectory" in out:
            frames = out["trajectory"]
            out["trajectory"] = tf.reshape(
                frames, tf.concat([[tf.shape(frames)[0], -1, k], tf.shape(frames)[2:]], 0))
        return out

    def _check_examples(self, t, seeds, name):
        if not t.shape[1:].is_compatible_with(self.shape):
            raise ValueError(f"{name} must have shape [N, {', '.join(map(str, self.shape))}], "
                             f"got {t.shape}")
        return checked(t, tf.debugging.assert_equal(
            tf.shape(t)[0], tf.size(seeds), message=f"{name} must have one example per seed"))

    def _sigmas(self):
        return tf.cast(tf.convert_to_tensor(self.sigmas), tf.float32)

    def _anneal(self, x, start_level, end_level, settings: dict, draw_noise, set_known,
                memory=None) -> dict:
        """The loop over global steps [start_level·S, end_level·S) as a while_loop, S steps
        per level."""
        per_level = self._steps_per_level(**settings)
        first, last = start_level * per_level, end_level * per_level
        every = self.trajectory_every
        state = {"x": x}
        if memory is not None:
            state["memory"] = memory
        if every:
            state["frames"] = tf.TensorArray(tf.float32, size=last // every - first // every,
                                             element_shape=x.shape)
        if self.diagnostics:
            state["logs"] = {name: tf.TensorArray(tf.int32 if name == "level" else tf.float32,
                                                  size=last - first) for name in DIAGNOSTICS}

        def body(step, state):
            x = state["x"]
            level = step // per_level
            sigma = self._level_sigma(level)
            if set_known is not None:
                x = set_known(x, step, sigma)
            z = draw_noise(step)
            x, grad, step_size, memory = self._step(x, level, step % per_level, z,
                                                    state.get("memory"), **settings)
            new = {"x": x}
            if memory is not None:
                new["memory"] = memory
            if every:
                frames = state["frames"]
                new["frames"] = tf.cond(
                    (step + 1) % every == 0,
                    lambda: frames.write((step + 1) // every - 1 - first // every, x),
                    lambda: frames)
            if self.diagnostics:
                grad_norm = tf.reduce_mean(norms(grad))
                values = dict(
                    level=level, step_size=step_size, grad_norm=grad_norm,
                    image_norm=tf.reduce_mean(norms(x)),
                    snr=tf.sqrt(step_size / 2.0) * grad_norm / tf.reduce_mean(norms(z)),
                    grad_mean_norm=tf.reduce_sum(tf.square(tf.reduce_mean(grad, 0)))
                    * tf.square(sigma))
                new["logs"] = {k: state["logs"][k].write(step - first, values[k])
                               for k in DIAGNOSTICS}
            return step + 1, new

        _, state = tf.while_loop(lambda step, _: step < last, body, (first, state))
        out = {"samples": state["x"]}
        if "memory" in state:
            out["memory"] = state["memory"]
        if every:
            frames = state["frames"]
            empty = tf.zeros(tf.concat([[0], tf.shape(x)], 0))  # a chunk shorter than `every`
            out["trajectory"] = tf.cond(frames.size() > 0, frames.stack, lambda: empty)
        if self.diagnostics:
            out["diagnostics"] = {k: v.stack() for k, v in state["logs"].items()}
        return out


def _seeds(seeds) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(seeds), tf.int64)


def _optional(t):
    return None if t is None else tf.convert_to_tensor(t, tf.float32)


def _image_and_mask(image, mask):
    """Inpainting inputs as float32 tensors, the mask as [N or 1, H, W, C or 1]."""
    if (image is None) != (mask is None):
        raise ValueError("inpainting needs both image and mask")
    if image is None:
        return None, None
    image, mask = _optional(image), _optional(mask)
    if image.shape.rank != 4:
        raise ValueError(f"image must be [N, H, W, C], got shape {image.shape}")
    if mask.shape.rank == 3:
        mask = mask[None]
    if mask.shape.rank != 4:
        raise ValueError(f"mask must be [H, W, C] or [N, H, W, C], got shape {mask.shape}")
    for axis, (m, n) in enumerate(zip(mask.shape, image.shape)):
        if None not in (m, n) and m != n and not (m == 1 and axis in (0, 3)):
            raise ValueError(f"{_MASK_SHAPES}; got mask shape {mask.shape}, image shape "
                             f"{image.shape}")
    return image, mask


def checked(tensor, *checks):
    """`tensor`, available only once the assertion ops `checks` have passed."""
    with tf.control_dependencies([c for c in checks if c is not None]):
        return tf.identity(tensor)


def _check_seeds(seeds):
    return checked(
        seeds,
        tf.debugging.assert_rank(seeds, 1, message="seeds must be a vector: one example per seed"),
        tf.debugging.assert_positive(tf.size(seeds),
                                     message="seeds must be non-empty: one example per seed"))


def per_seed(draw, seeds, stream, shape, step=0):
    """`draw` (philox.uniform or philox.normal) of `shape` per seed, keyed by (seed, step,
    stream): [N, *shape] in a constant number of batched ops."""
    return draw(seeds, tf.cast(step, tf.int64) * _NUM_STREAMS + stream, shape)


def _set_known(image, is_known, seeds, shape, x, step, sigma):
    """Inpainting: the known pixels of `x` set to image + σ·z, with fresh noise at every step."""
    z = per_seed(philox.normal, seeds, _KNOWN, shape, step)
    return tf.where(is_known, image + sigma * z, x)


def norms(t):
    """Euclidean norm of each example."""
    return tf.norm(tf.reshape(t, [tf.shape(t)[0], -1]), axis=1)


def _check_mask(image, mask):
    """`mask` [N or 1, H, W, C or 1] broadcast to `image` after checking its shape and values."""
    image_shape, mask_shape = tf.shape(image), tf.shape(mask)
    fits = (mask_shape == image_shape) | ((mask_shape == 1) & [True, False, False, True])
    mask = checked(
        mask,
        tf.debugging.Assert(tf.reduce_all(fits), [_MASK_SHAPES + "; mask shape", mask_shape,
                                                  "image shape", image_shape]),
        tf.debugging.Assert(tf.reduce_all((mask == 0.0) | (mask == 1.0)),
                            ["mask must contain only 0 (unknown pixel) and 1 (known pixel)"]))
    return tf.broadcast_to(mask, image_shape)


def write_diagnostics(summary_writer: tf.summary.SummaryWriter, diagnostics: dict,
                      first_step: int = 0, prefix: str = "langevin/") -> None:
    """Write the per-step `diagnostics` of a run as TensorBoard scalars, x-axis = Langevin step.

    `first_step` is the global step index of the first entry (start_level · steps_per_level
    for a chunk of a run).
    """
    values = {k: v.numpy() for k, v in diagnostics.items()}
    with summary_writer.as_default():
        for i in range(len(values["level"])):
            for name, v in values.items():
                tf.summary.scalar(prefix + name, v[i], step=first_step + i)
    summary_writer.flush()


"""`ScoreModel`: trains a score network with the annealed DSM loss and keeps its EMA copy.

`model.fit(images)` runs `train_step`: per-example noise levels and noise, the DSM loss over the
global batch, an Adam step (PyTorch semantics, `optimizers.Adam`) and the EMA update
ema ← rate·ema + (1 − rate)·w (Technique 5). `ema_net` is a second network of the same
architecture whose weights hold the average; it is what sampling and `test_step` use, and it
never overwrites the live `net`.

The random draws are stateless: example k of the global batch at training step t uses seeds
derived from (config.training.seed, t), and each replica keeps its own rows of the global draw.
So a run gives the same numbers on one device or on several replicas, and a resumed run draws
what an uninterrupted one would have drawn. The training step `step` is the model's own counter,
not the optimizer's: a run resumed without optimizer state (from a converted official
checkpoint) continues at its step while Adam's bias correction starts afresh.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from ncsn_tf import models
from ncsn_tf.training import optimizers
from ncsn_tf.config import presets, schema
from ncsn_tf.training.losses import dsm_loss

_TRAIN_STREAM, _TEST_STREAM = 0, 1


def draw_perturbation(seed: tf.Tensor, shape: tf.Tensor, num_scales: int,
                      global_batch: tf.Tensor | int | None = None, start: tf.Tensor | int = 0
                      ) -> tuple[tf.Tensor, tf.Tensor]:
    """Noise level indices, uniform over [0, num_scales), and z ~ N(0, I) for a batch of
    `shape` that is rows start … start + shape[0] of a global batch.

    The whole global batch (default: just this one) is drawn from the stateless `seed` ([2]
    ints) and the batch keeps its own rows, so the draws do not depend on how a global batch
    is split across replicas.
    """
    shape = tf.convert_to_tensor(shape)
    if global_batch is None:
        global_batch = shape[0]
    label_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    labels = tf.random.stateless_uniform([global_batch], label_seed, minval=0,
                                         maxval=num_scales, dtype=tf.int32)
    noise = tf.random.stateless_normal(tf.concat([[global_batch], shape[1:]], axis=0),
                                       noise_seed)
    return labels[start:start + shape[0]], noise[start:start + shape[0]]


class ScoreModel(keras.Model):
    """Live score network `net` + its EMA `ema_net`, trained by `fit` on images in [0, 1].

    Metrics (Keras running means over an epoch): `loss`, the DSM loss per example; `grad_norm`,
    the global norm of the gradient before clipping (steps that fp16 loss scaling skips are
    left out); `loss_bucket_k` for k < K = num_buckets, the DSM loss of the examples whose noise
    level index lies in [k·L/K, (k+1)·L/K), bucket 0 holding the largest σ (a bucket that saw
    no example reads 0). `test_step` reports the same losses for `ema_net`.

    Args:
      config: the run's config (σ table from `net.sigmas`; `anneal_power`, `ema_rate`, `seed`).
      net, ema_net: two score networks of the same architecture, called as
        `net(x, labels, training=...)`, with a non-trainable `sigmas` weight. Built from
        `config` by `models.build` when not given. `ema_net` is set non-trainable and starts as
        a copy of `net`.
      num_buckets: how many noise-level buckets to report losses for.

    `step` (int64 variable) counts training steps; `held_out_stats` gives the loss statistics
    of a held-out batch under draws keyed by a batch key alone, and `evaluate` restarts them,
    so a checkpoint's held-out loss depends on that checkpoint and the seed only.
    """

    def __init__(self, config: presets.Config, net: keras.Model | None = None,
                 ema_net: keras.Model | None = None, num_buckets: int = 4, **kwargs):
        super().__init__(**kwargs)
        schema.validate(config)
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be ≥ 1, got {num_buckets}")
        self.config = config
        self.net = net if net is not None else models.build(config)
        self.ema_net = ema_net if ema_net is not None else models.build(config)
        self.ema_net.trainable = False
        live, ema = self.net.weights, self.ema_net.weights
        if [w.shape for w in live] != [w.shape for w in ema]:
            raise ValueError("net and ema_net must have the same architecture (their weights' "
                             "shapes differ)")
        for e, w in zip(ema, live):
            e.assign(w)
        self._ema_pairs = [(e, w) for e, w in zip(ema, live) if w.trainable]
        self.num_scales = int(self.net.sigmas.shape[0])
        self.num_buckets = min(num_buckets, self.num_scales)
        counter = dict(dtype=tf.int64, trainable=False,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.step = tf.Variable(0, name="step", **counter)
        self._test_batches = tf.Variable(0, name="test_batches", **counter)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.grad_norm_tracker = keras.metrics.Mean(name="grad_norm")
        self.bucket_trackers = [keras.metrics.Mean(name=f"loss_bucket_{k}")
                                for k in range(self.num_buckets)]
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker, self.grad_norm_tracker, *self.bucket_trackers]

    def compile(self, optimizer: keras.optimizers.Optimizer | None = None,
                jit_compile: bool = False, **kwargs):
        """Compiles with `optimizers.build_optimizer(config)` unless an optimizer is given.

        XLA (`jit_compile`) is off by default: on CPU it does not pay off for this network.
        The optimizer is built here on `net`'s weights only (no slots for `ema_net`), so its
        state exists before a checkpoint is restored into it.
        """
        if optimizer is None:
            optimizer = optimizers.build_optimizer(self.config)
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)
        self.optimizer.build(self.net.trainable_variables)

    def evaluate(self, *args, **kwargs):
        """Keras' `evaluate` with the held-out draws restarted: every call (every checkpoint)
        sees the same noise levels and noise for the same batches."""
        self._test_batches.assign(0)
        return super().evaluate(*args, **kwargs)

    def train_step(self, data):
        x = _images(data)
        labels, noise, global_batch = self._perturbation(
            x, self._seed(_TRAIN_STREAM, self.step))
        variables = self.net.trainable_variables
        with tf.GradientTape() as tape:
            per_example = dsm_loss(lambda y, i: self.net(y, i, training=True), x,
                                   self.net.sigmas, labels, noise,
                                   self.config.training.anneal_power)
            # This replica's share of the global-batch mean: summing the gradients over the
            # replicas gives the single-device gradient.
            loss = tf.reduce_sum(per_example) / tf.cast(global_batch, tf.float32)
            scaled_loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, variables)
        grads, stats = _sum_over_replicas(grads, self._loss_stats(per_example, labels))
        grad_norm = tf.linalg.global_norm(grads)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            grad_norm /= self.optimizer.dynamic_scale
        self.optimizer.apply(grads, variables)
        # A step that fp16 loss scaling skips (non-finite gradient) leaves the EMA alone too,
        # and is left out of the mean gradient norm.
        finite = tf.math.is_finite(grad_norm)
        self._update_ema(finite)
        self.step.assign_add(1)
        self.grad_norm_tracker.update_state(tf.where(finite, grad_norm, 0.0),
                                            sample_weight=tf.cast(finite, tf.float32))
        logs = self._update_loss_trackers(stats, global_batch)
        return {**logs, "grad_norm": self.grad_norm_tracker.result()}

    def test_step(self, data):
        stats, global_batch = self.held_out_stats(_images(data), self._test_batches)
        self._test_batches.assign_add(1)
        return self._update_loss_trackers(stats, global_batch)

    def held_out_stats(self, x: tf.Tensor, key) -> tuple[tf.Tensor, tf.Tensor]:
        """The EMA network's DSM loss statistics on held-out images `x` (this replica's rows of
        a global batch), summed over replicas: ([sum of losses, K bucket sums, K bucket
        counts], global batch size). The draws depend on `key` and the seed alone; the model's
        metrics are left untouched."""
        labels, noise, global_batch = self._perturbation(x, self._seed(_TEST_STREAM, key))
        per_example = dsm_loss(lambda y, i: self.ema_net(y, i, training=False), x,
                               self.ema_net.sigmas, labels, noise,
                               self.config.training.anneal_power)
        _, stats = _sum_over_replicas([], self._loss_stats(per_example, labels))
        return stats, global_batch

    def _perturbation(self, x, seed):
        """(labels, noise, global batch size) for this replica's examples `x`."""
        local_batch = tf.shape(x)[0]
        context = tf.distribute.get_replica_context()
        if context.num_replicas_in_sync > 1:
            sizes = context.all_gather(local_batch[None], axis=0)
            global_batch = tf.reduce_sum(sizes)
            start = tf.reduce_sum(sizes[:context.replica_id_in_sync_group])
        else:
            global_batch, start = local_batch, 0
        labels, noise = draw_perturbation(seed, tf.shape(x), self.num_scales, global_batch,
                                          start)
        return labels, noise, global_batch

    def _seed(self, *counters):
        """A stateless seed from config.training.seed and `counters` (stream, step, ...)."""
        seed = tf.constant([self.config.training.seed, 0], tf.int64)
        for counter in counters:
            seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(counter, tf.int64))
        return seed

    def _loss_stats(self, per_example, labels):
        """[sum of losses, K bucket sums, K bucket counts] over this replica's examples."""
        buckets = labels * self.num_buckets // self.num_scales
        sums = tf.math.unsorted_segment_sum(per_example, buckets, self.num_buckets)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(per_example), buckets,
                                              self.num_buckets)
        return tf.concat([tf.reduce_sum(per_example)[None], sums, counts], axis=0)

    def _update_loss_trackers(self, stats, global_batch):
        """Updates the loss trackers from global-batch `stats`; returns their current values."""
        k = self.num_buckets
        # Weighted by the batch size, so a partial last batch counts for what it holds.
        batch = tf.cast(global_batch, tf.float32)
        self.loss_tracker.update_state(stats[0] / batch, sample_weight=batch)
        for tracker, total, count in zip(self.bucket_trackers, tf.unstack(stats[1:1 + k]),
                                         tf.unstack(stats[1 + k:])):
            tracker.update_state(total / tf.maximum(count, 1.0), sample_weight=count)
        return {m.name: m.result() for m in (self.loss_tracker, *self.bucket_trackers)}

    def _update_ema(self, apply: tf.Tensor):
        """ema ← rate·ema + (1 − rate)·w for every trainable weight, on every replica, where
        `apply` (a boolean scalar) holds; no change otherwise."""
        decay = tf.where(apply, 1.0 - self.config.model.ema_rate, 0.0)

        def update(strategy):
            for ema, live in self._ema_pairs:
                strategy.extended.update(
                    ema.value, lambda e, w: e.assign_sub(decay * (e - w)),
                    args=(live.value,), group=False)

        tf.distribute.get_replica_context().merge_call(update)


def _images(data):
    """The image batch of a `fit` batch: the tensor itself or the first element of a tuple."""
    return data[0] if isinstance(data, (tuple, list)) else data


def _sum_over_replicas(grads, stats):
    """Sums the gradients and loss statistics over replicas in one all-reduce."""
    context = tf.distribute.get_replica_context()
    if context.num_replicas_in_sync == 1:
        return grads, stats
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [*grads, stats])
    return summed[:-1], summed[-1]

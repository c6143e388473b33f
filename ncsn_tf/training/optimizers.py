"""Adam with PyTorch's update rule, as the official NCSNv2 trainer uses (torch.optim.Adam).

PyTorch adds ε after the bias correction, p ← p − lr·m̂/(√v̂ + ε), while Keras' Adam adds it
before (ε-hat). The difference matters at FFHQ's ε = 1e-3. Multiplying numerator and denominator
by √(1 − β2^t) shows that PyTorch's rule is TF's fused Adam kernel with ε_t = ε·√(1 − β2^t), so
the update runs as one fused op per variable.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from ncsn_tf.config import presets, schema


class Adam(keras.optimizers.Adam):
    """torch.optim.Adam semantics: ε after bias correction, L2-style weight decay.

    `weight_decay` is PyTorch's: it adds `weight_decay · p` to the gradient before the moment
    updates (not Keras' decoupled decay). `global_clipnorm` clips the gradient by its global
    norm before that.

    Under tf.distribute, `apply` expects gradients that are ALREADY summed over replicas:
    `ScoreModel.train_step` sums them once, so that clipping, the logged gradient norm and
    LossScaleOptimizer's finiteness check all see the global gradient. Keras' own all-reduce,
    which would run after clipping, is therefore skipped.
    """

    def __init__(self, learning_rate: float = 1e-4, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, weight_decay: float = 0.0,
                 global_clipnorm: float | None = None, name: str = "adam", **kwargs):
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                         epsilon=epsilon, global_clipnorm=global_clipnorm, name=name, **kwargs)
        self.l2_weight_decay = float(weight_decay or 0.0)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        gradient = tf.cast(tf.convert_to_tensor(gradient), dtype)
        if self.l2_weight_decay:
            gradient += self.l2_weight_decay * tf.convert_to_tensor(variable)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), step)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]),
            v=_handle(self._velocities[index]), beta1_power=beta_1_power,
            beta2_power=beta_2_power, lr=tf.cast(learning_rate, dtype),
            beta1=tf.cast(self.beta_1, dtype), beta2=tf.cast(self.beta_2, dtype),
            epsilon=tf.cast(self.epsilon, dtype) * tf.sqrt(1.0 - beta_2_power), grad=gradient)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # Gradients arrive summed over replicas (see the class docstring).
        return grads_and_vars

    def get_config(self):
        config = super().get_config()
        config["weight_decay"] = self.l2_weight_decay
        return config


def _handle(variable) -> tf.Tensor:
    """The resource handle of a Keras or TF variable (the local copy inside a distributed
    update)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


def build_optimizer(config: presets.Config) -> keras.optimizers.Optimizer:
    """Adam from `config.optim` (validated); wrapped in a dynamic LossScaleOptimizer for fp16
    training."""
    schema.validate(config)
    o = config.optim
    optimizer = Adam(learning_rate=o.lr, beta_1=o.beta1, beta_2=o.beta2, epsilon=o.adam_eps,
                     weight_decay=o.weight_decay, global_clipnorm=o.grad_clip or None)
    if config.training.precision == "fp16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer

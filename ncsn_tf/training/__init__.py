"""Training: the DSM loss (`losses`), PyTorch-semantics Adam (`optimizers`), the Keras model
whose `train_step` is the paper's update with the EMA (`score_model`), the callbacks that
log, snapshot and stop (`callbacks`), checkpoints and the workdir lock (`checkpoints`,
`workdir_lock`), and the loop that runs them under a tf.distribute strategy (`loop`)."""
from ncsn_tf.training.loop import (MAX_TO_KEEP, SAMPLES_DIR, STRATEGIES, TENSORBOARD_DIR,
                                   RunConfigError, RunOptions, TrainResult, check_batch_size,
                                   create_strategy, evaluate_checkpoints, initialize_from,
                                   prepare_workdir, snapshot_levels, train)

__all__ = ["MAX_TO_KEEP", "SAMPLES_DIR", "STRATEGIES", "TENSORBOARD_DIR", "RunConfigError",
           "RunOptions", "TrainResult", "check_batch_size", "create_strategy",
           "evaluate_checkpoints", "initialize_from", "prepare_workdir", "snapshot_levels",
           "train"]

"""Evaluation of generated images: FID, IS, precision/recall, KID, nearest neighbours, sweeps.

One module per job, the command line in `ncsn_tf.evaluate`:
    sources     images from .npz files, folders, arrays, datasets  → NHWC batches
    fid         features through a FeatureNetwork → reference statistics and features, FID,
                IS, precision/recall, KID and the least realistic samples
    trained     samples drawn from a checkpoint or a SavedModel, and their FID/IS
    sweep       fast FID of every checkpoint of a run
    neighbors   nearest training images of samples, and their grid
"""
from ncsn_tf.evaluation.fid import (ManifoldMetrics, Statistics, compute_fid_is,
                                    dataset_statistics, reference_features,
                                    reference_statistics)
from ncsn_tf.evaluation.neighbors import Neighbors, nearest_neighbors, neighbor_grid
from ncsn_tf.evaluation.sources import batches_of, image_folder_batches, load_samples, to_nhwc
from ncsn_tf.evaluation.sweep import SWEEP_CSV, SWEEP_CSV_FIELDS, SWEEP_LOGDIR, fast_fid_sweep
from ncsn_tf.evaluation.trained import (SampleFn, TrainedModel, checkpoint_sample_fn,
                                        generate_samples, load_checkpoint_model,
                                        load_saved_model, model_fid_is)
from ncsn_tf.images import save_samples

__all__ = [
    "ManifoldMetrics", "Neighbors", "SWEEP_CSV", "SWEEP_CSV_FIELDS", "SWEEP_LOGDIR", "SampleFn",
    "Statistics",
    "TrainedModel", "batches_of", "checkpoint_sample_fn", "compute_fid_is", "dataset_statistics",
    "fast_fid_sweep", "generate_samples", "image_folder_batches", "load_checkpoint_model",
    "load_samples", "load_saved_model", "model_fid_is", "nearest_neighbors", "neighbor_grid",
    "reference_features", "reference_statistics", "save_samples", "to_nhwc",
]

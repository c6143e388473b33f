"""The pipeline's components: KFP v2 lightweight Python components in TFX's vocabulary.

    ExampleGen → StatisticsGen → Trainer → Evaluator → Pusher

Each component is a thin shell: it turns artifacts into paths and metadata, calls the module
of `pipelines` named after it that does the work (example_gen, statistics_gen, trainer,
evaluator, pusher) and records the result in its output artifacts. KFP runs a component's
function source on its own (in a subprocess locally, in the container image on Kubeflow /
Vertex AI), so every import sits inside the function and `ncsn_tf` and `pipelines` must be
importable there: installed in the image (pipelines/Dockerfile), or on PYTHONPATH for local
runs (`python -m pipelines.run` sets it). Every output artifact gets a file or directory: KFP's
local cache only reuses outputs that exist on disk.
"""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

# The image the components run in on Kubeflow / Vertex AI; the pipeline replaces it by its
# `image` parameter (`set_container_image`). Local runs execute in this Python environment.
BASE_IMAGE = "ncsn-tf:latest"


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def example_gen(dataset: str, preset: str, data_dir: str, image_size: int, channels: int,
                max_train_examples: int, max_eval_examples: int, examples: Output[Dataset]):
    """ExampleGen: the dataset's train and held-out splits, preprocessed, as sharded TFRecords.

    `dataset`: a TFDS name, digits, folder:PATH or tfrecord:GLOB. `preset` "" picks the preset
    of the dataset; `data_dir` "" is TFDS' default; `image_size`, `channels` 0 keep the
    preset's; `max_*_examples` 0 takes the whole split.
    """
    import json

    from ncsn_tf.config import flags

    config = flags.resolve_config(preset or None, overrides=dict(
        dataset=dataset, data_dir=data_dir or None, image_size=image_size or None,
        channels=channels or None))
    from pipelines import example_gen as example_files  # TensorFlow starts after the checks

    summary = example_files.write(config, examples.path,
                                  max_train_examples=max_train_examples or None,
                                  max_eval_examples=max_eval_examples or None)
    examples.metadata.update(summary)
    print(json.dumps(summary))
    print(f"ExampleGen: {summary['num_train']:,} train and {summary['num_eval']:,} held-out "
          f"images of {'x'.join(map(str, summary['shape']))} from {summary['source']}")


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def statistics_gen(examples: Input[Dataset], statistics: Output[Artifact]):
    """StatisticsGen: count, shape, D, mean image, σ1 (Technique 1) and the L and ε that
    Techniques 2 and 4 propose."""
    from pipelines import statistics_gen as dataset_statistics

    stats = dataset_statistics.compute(examples.path, statistics.path)
    proposal = stats["proposal"]
    statistics.metadata.update({
        "num_examples": stats["num_examples"], "shape": stats["shape"], "dim": stats["dim"],
        "sigma_begin": stats["sigma_begin"], "sigma_begin_method": stats["sigma_begin_method"],
        "proposed_num_scales": proposal["num_scales"],
        "proposed_step_lr": proposal["step_lr"],
        "proposed_for": {"sigma_end": proposal["sigma_end"],
                         "n_steps_each": proposal["n_steps_each"]},
    })
    print(dataset_statistics.report(stats))
    print(f"StatisticsGen: sigma_begin {stats['sigma_begin']:.4g}, proposed num_scales "
          f"{proposal['num_scales']} and step_lr {proposal['step_lr']:.3g}")


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def trainer(examples: Input[Dataset], statistics: Input[Artifact], use_proposed_noise: bool,
            config_overrides: dict, model: Output[Model], tensorboard: Output[Artifact]):
    """Trainer: NCSNv2 on the train split; the Model artifact is the training workdir.

    Noise scales come from StatisticsGen when `use_proposed_noise`; `config_overrides` (any
    config field) override the rest.
    """
    import os

    from pipelines import trainer as training

    config, sources = training.training_config(examples.path, statistics.path,
                                               dict(config_overrides),
                                               use_proposed_noise=use_proposed_noise)
    for field, source in sorted(sources.items()):
        print(f"Trainer: {field} = {training.config_value(config, field)!r} ({source})")
    os.makedirs(tensorboard.path, exist_ok=True)
    step = training.train(config, model.path, tensorboard.path)
    model.metadata.update({"framework": "tensorflow", "step": step, "preset": config.name,
                           **{field: training.config_value(config, field) for field in sources}})
    tensorboard.metadata["logdir"] = tensorboard.path
    print(f"Trainer: trained {config.name} to step {step:,}; TensorBoard logs in "
          f"{tensorboard.path}")


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluator(model: Input[Model], examples: Input[Dataset], feature_network: str,
              num_samples: int, fid_threshold: float, serving_base: str, model_name: str,
              evaluation: Output[Artifact], metrics: Output[Metrics],
              blessing: Output[Artifact]):
    """Evaluator: FID (and IS) of EMA samples vs the eval split, and the blessing: FID at most
    `fid_threshold` (<= 0: no threshold) and no worse than the last pushed model's."""
    import json
    import os

    from pipelines import evaluator as model_evaluation
    from pipelines import pusher as pushing

    result = model_evaluation.evaluate(model.path, examples.path, evaluation.path,
                                       feature_network=feature_network,
                                       num_samples=num_samples)
    for name in ("fid", "inception_score", "inception_score_std"):
        if result[name] is not None:
            metrics.log_metric(name, result[name])
    metrics.log_metric("num_samples", result["num_samples"])
    metrics.metadata["network"] = result["network"]
    with open(metrics.path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    evaluation.metadata.update(result)

    verdict = model_evaluation.bless(result, fid_threshold,
                                     pushing.latest(serving_base, model_name))
    blessing.metadata.update({"blessed": verdict.blessed, "reasons": verdict.reasons,
                              "baseline_version": verdict.baseline_version,
                              "baseline_fid": verdict.baseline_fid})
    os.makedirs(blessing.path, exist_ok=True)
    with open(os.path.join(blessing.path, "BLESSED" if verdict.blessed else "NOT_BLESSED"),
              "w", encoding="utf-8") as f:
        f.write("\n".join(verdict.reasons) + "\n")
    print(f"Evaluator: FID {result['fid']:.6g} ({result['network']}, {num_samples} samples); "
          f"{'BLESSED' if verdict.blessed else 'NOT BLESSED'}: {'; '.join(verdict.reasons)}")


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def pusher(model: Input[Model], blessing: Input[Artifact], evaluation: Input[Artifact],
           serving_base: str, model_name: str, pushed_model: Output[Artifact]):
    """Pusher: a blessed model becomes the next version of <serving_base>/<model_name>/ for
    TF Serving (atomically); a model that is not blessed is not pushed."""
    import json

    record = {"pushed": False, "version": None, "path": None,
              "blessing": list(blessing.metadata.get("reasons", []))}
    if blessing.metadata.get("blessed"):
        # TensorFlow starts only for a model to push.
        from pipelines import evaluator as model_evaluation
        from pipelines import pusher as pushing

        evaluation_record = dict(model_evaluation.read_metrics(evaluation.path),
                                 blessing=record["blessing"], model=model.uri)
        pushed = pushing.push(model.path, serving_base, model_name, evaluation_record)
        record.update(pushed=True, version=pushed.version, path=pushed.path)
        print(f"Pusher: pushed version {pushed.version} to {pushed.path}")
    else:
        print("Pusher: not pushed, the model is not blessed: " + "; ".join(record["blessing"]))
    pushed_model.metadata.update(record)
    with open(pushed_model.path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)

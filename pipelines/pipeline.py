"""The NCSNv2 pipeline: ExampleGen → StatisticsGen → Trainer → Evaluator → Pusher (KFP v2).

One definition serves local runs (`kfp.local`, see `pipelines.run`) and Kubeflow Pipelines /
Vertex AI Pipelines (`compile`): every task runs in the container image named by the `image`
parameter there, while the local SubprocessRunner runs them in the current Python environment.
"""

from typing import Any, NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Artifact, Metrics

from pipelines import components

PIPELINE_NAME = "ncsn-tf"
# Task names (from the component functions) and the TFX names shown in the UI and errors.
DISPLAY_NAMES = {"example-gen": "ExampleGen", "statistics-gen": "StatisticsGen",
                 "trainer": "Trainer", "evaluator": "Evaluator", "pusher": "Pusher"}


class Outputs(NamedTuple):
    metrics: Metrics
    blessing: Artifact
    pushed_model: Artifact


@dsl.pipeline(name=PIPELINE_NAME, description=(
    "NCSNv2 (Song & Ermon 2020): ingest a dataset, measure the statistics that set the noise "
    "scales, train, evaluate FID against the held-out split and push a blessed model to TF "
    "Serving's model base path."))
def ncsn_pipeline(
        dataset: str = "digits",
        preset: str = "",
        data_dir: str = "",
        image_size: int = 0,
        channels: int = 0,
        max_train_examples: int = 0,
        max_eval_examples: int = 0,
        use_proposed_noise: bool = True,
        config_overrides: dict = {},  # noqa: B006 (KFP reads the default from the signature)
        feature_network: str = "tfgan",
        num_eval_samples: int = 1000,
        fid_threshold: float = 0.0,
        serving_base: str = "saved_models",
        model_name: str = "ncsn",
        image: str = components.BASE_IMAGE,
) -> Outputs:
    """Parameters: the data (`dataset`, `preset` ("" = the dataset's), `data_dir`,
    `image_size`/`channels` (0 = the preset's), `max_*_examples` (0 = all)); training
    (`use_proposed_noise`: σ1, L, ε from StatisticsGen; `config_overrides`: any config field,
    e.g. {"n_iters": 1500, "batch_size": 64}); evaluation (`feature_network`: tfgan,
    keras or random-test; `num_eval_samples`; `fid_threshold` (<= 0: none)); serving
    (`serving_base`, `model_name`); `image`: the container image on Kubeflow / Vertex AI."""
    gen = components.example_gen(
        dataset=dataset, preset=preset, data_dir=data_dir, image_size=image_size,
        channels=channels, max_train_examples=max_train_examples,
        max_eval_examples=max_eval_examples)
    stats = components.statistics_gen(examples=gen.outputs["examples"])
    train = components.trainer(
        examples=gen.outputs["examples"], statistics=stats.outputs["statistics"],
        use_proposed_noise=use_proposed_noise, config_overrides=config_overrides)
    evaluate = components.evaluator(
        model=train.outputs["model"], examples=gen.outputs["examples"],
        feature_network=feature_network, num_samples=num_eval_samples,
        fid_threshold=fid_threshold, serving_base=serving_base, model_name=model_name)
    push = components.pusher(
        model=train.outputs["model"], blessing=evaluate.outputs["blessing"],
        evaluation=evaluate.outputs["evaluation"], serving_base=serving_base,
        model_name=model_name)
    for task in (gen, stats, train, evaluate, push):
        task.set_display_name(DISPLAY_NAMES[task.name]).set_container_image(image)
    return Outputs(metrics=evaluate.outputs["metrics"], blessing=evaluate.outputs["blessing"],
                   pushed_model=push.outputs["pushed_model"])


def compile_pipeline(path: str, **defaults: Any) -> None:
    """Writes the pipeline spec (YAML) for Kubeflow Pipelines / Vertex AI Pipelines to `path`.

    `defaults` replace the parameters' default values in the spec, e.g. image="…/ncsn-tf:1".
    """
    compiler.Compiler().compile(ncsn_pipeline, path, pipeline_parameters=defaults or None)

"""The NCSNv2 pipeline on Kubeflow Pipelines v2, in TFX's vocabulary (see pipelines/run.py).

ExampleGen → StatisticsGen → Trainer → Evaluator → Pusher. `components` and `pipeline` are
the KFP definitions; `example_gen`, `statistics_gen`, `trainer`, `evaluator` and `pusher` do each
component's work as plain Python on top of the public `ncsn_tf` API.
"""

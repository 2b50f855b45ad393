"""Ray Train's TorchTrainer for the embedded Ray of one driver: the run's controller without the helper actors that
exist for long-lived, autoscaling clusters.

Every actor Ray Train starts is a Python process that imports Ray (and more) while the worker imports torch and
transformers, on the same cores: on a 2-core machine the first step of a cold run waited on four of them. An embedded
Ray ends with its driver, runs no dashboard and no autoscaler, so they have nothing to do there:

- the placement-group cleaner (a detached actor) removes a run's placement group when the controller dies while the
  cluster lives on; it asks the State API, which the dashboard serves;
- Ray Data's autoscaling coordinator takes the run's resource request for an autoscaler; the controller waits for
  this actor to start before it places the workers;
- the dataset manager serves Ray Data shards: started even for a run without Ray datasets;
- the preemption watcher polls the cluster's nodes for a preemption notice (cloud spot nodes); turned off by its own
  switch (`RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`, see `cluster.start_embedded_ray`).

This module is imported by Ray Train's controller process (the scaling policy is pickled by reference), so it imports
nothing of raytrainer's own and nothing heavier than Ray Train.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

CALLBACKS_FOR_LONG_LIVED_CLUSTERS = ("PlacementGroupCleanerCallback",)
CALLBACKS_FOR_RAY_DATASETS = ("DatasetsCallback",)


class FixedScalingWithoutAutoscaler(FixedScalingPolicy):
    """Ray Train's fixed-size scaling policy without its resource requests to an autoscaler (there is none)."""

    def _send_resource_request(self):
        pass

    def _maybe_send_resource_request(self):
        pass

    def _cancel_resource_request(self):
        pass


class TorchTrainerInEmbeddedRay(TorchTrainer):
    """`TorchTrainer` whose controller starts only the actors a run on the embedded Ray uses (see the module)."""

    def _create_default_callbacks(self):
        dropped = CALLBACKS_FOR_LONG_LIVED_CLUSTERS + (() if self.datasets else CALLBACKS_FOR_RAY_DATASETS)
        return [callback for callback in super()._create_default_callbacks()
                if type(callback).__name__ not in dropped]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["scaling_policy"] = FixedScalingWithoutAutoscaler(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)

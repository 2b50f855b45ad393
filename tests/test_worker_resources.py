"""`resources_per_worker` and `placement_strategy` reach Ray: read back from inside the workers."""

import pytest
from transformers import TrainerCallback

from helpers import RegressionModel, regression_dataset, training_settings
from raytrainer import Trainer, TrainingArguments

pytestmark = pytest.mark.usefixtures("ray_session")


class WhatRayGaveMe(TrainerCallback):
    """Rank 0's resources and placement-group strategy, as Ray reports them inside the worker."""

    def __init__(self):
        self.seen = {}

    def on_evaluate(self, args, state, control, **kwargs):
        import ray
        from ray.util import get_current_placement_group, placement_group_table

        group = get_current_placement_group()
        self.seen = {"resources": ray.get_runtime_context().get_assigned_resources(),
                     "strategy": placement_group_table(group)["strategy"] if group is not None else None,
                     "bundles": placement_group_table(group)["bundles"] if group is not None else None}


def test_resources_per_worker_and_placement_strategy_are_what_the_workers_get(tmp_path):
    seen = WhatRayGaveMe()
    args = TrainingArguments(**training_settings(tmp_path, "rt"), num_workers=2, resources_per_worker={"CPU": 2},
                             placement_strategy="SPREAD")
    with Trainer(model=RegressionModel(), args=args, callbacks=[seen]) as trainer:
        trainer.evaluate(regression_dataset(8))
    assert seen.seen["resources"] == {"CPU": 2.0}, seen.seen
    assert seen.seen["strategy"] == "SPREAD", seen.seen
    assert [bundle.get("CPU") for bundle in seen.seen["bundles"].values()] == [2.0, 2.0], seen.seen

"""Classes of the user's own script (`__main__`) or test module train on 2 workers with checkpoints, with no path
set-up, and the checkpoint's `training_args.bin` loads back where those classes live."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import TrainerCallback

from helpers import RegressionModel, TorchRegressionDataset
from raytrainer import Trainer, TrainingArguments

pytestmark = pytest.mark.usefixtures("ray_session")

SCRIPT = textwrap.dedent('''
    import dataclasses, json, os, sys
    import torch
    import transformers
    from torch import nn
    from transformers import TrainerCallback
    import raytrainer

    @dataclasses.dataclass
    class MyArguments(raytrainer.TrainingArguments):
        loss_scale: float = 1.0

    class MyModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.tensor(0.0)), nn.Parameter(torch.tensor(0.0))

        def forward(self, x, labels=None):
            y = self.a * x + self.b
            return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)

    class MyDataset(torch.utils.data.Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(n, generator=g)
            self.y = 2 * self.x + 3

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    def my_collator(rows):
        return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}

    class Saves(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_save(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    class ScaledLoss:
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss * self.args.loss_scale

    class MyTrainer(ScaledLoss, raytrainer.Trainer):
        pass

    class TheirTrainer(ScaledLoss, transformers.Trainer):
        pass

    def arguments(name, **extra):
        return MyArguments(os.path.join(sys.argv[1], name), loss_scale=3.0, learning_rate=0.02, max_steps=8,
                           save_steps=4, logging_steps=1, report_to=[], disable_tqdm=True, **extra)

    if __name__ == "__main__":
        saves = Saves()
        ours = MyTrainer(model=MyModel(), args=arguments("ours", num_workers=2, per_device_train_batch_size=4),
                         train_dataset=MyDataset(64), data_collator=my_collator, callbacks=[saves])
        ours.train()
        theirs = TheirTrainer(model=MyModel(), args=arguments("theirs", per_device_train_batch_size=8),
                              train_dataset=MyDataset(64), data_collator=my_collator)
        theirs.train()
        saved = torch.load(os.path.join(sys.argv[1], "ours", "checkpoint-8", "training_args.bin"), weights_only=False)
        print("RESULT " + json.dumps({
            "args_type": type(saved).__qualname__, "args_module": type(saved).__module__,
            "is_script_class": type(saved) is MyArguments, "loss_scale": saved.loss_scale,
            "saves": saves.steps, "ours": [ours.model.a.item(), ours.model.b.item()],
            "theirs": [theirs.model.a.item(), theirs.model.b.item()],
            "losses": [e["loss"] for e in ours.state.log_history if "loss" in e],
            "their_losses": [e["loss"] for e in theirs.state.log_history if "loss" in e]}))
''')


def test_a_scripts_own_classes_train_on_two_workers_with_checkpoints(tmp_path, ray_session):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["args_type"] == "MyArguments" and result["args_module"] == "__main__"
    assert result["is_script_class"] and result["loss_scale"] == 3.0
    assert result["saves"] == [4, 8]  # the driver's callback object saw the workers' saves
    assert result["losses"] == pytest.approx(result["their_losses"], rel=1e-5)
    assert result["ours"] == pytest.approx(result["theirs"], rel=1e-5)
    assert sorted(os.listdir(tmp_path / "out" / "ours")) == ["checkpoint-4", "checkpoint-8"]


@dataclasses.dataclass
class ModuleArguments(TrainingArguments):
    """A TrainingArguments subclass of this test module (not importable on the workers)."""

    note: str = "from the test module"


class CountingCallback(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_a_test_modules_own_classes_train_with_checkpoints(tmp_path):
    counting = CountingCallback()
    args = ModuleArguments(str(tmp_path / "out"), num_workers=2, per_device_train_batch_size=4, max_steps=6,
                           save_steps=3, report_to=[], disable_tqdm=True, note="saved on a worker")
    Trainer(model=RegressionModel(), args=args, train_dataset=TorchRegressionDataset(32),
            callbacks=[counting]).train()
    saved = torch.load(tmp_path / "out" / "checkpoint-6" / "training_args.bin", weights_only=False)
    assert type(saved) is ModuleArguments and saved.note == "saved on a worker"
    assert counting.steps == 6

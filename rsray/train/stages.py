"""Earlier training stages: a model that starts from another model's checkpoint (PriorCLIP from the
scene prior; PriorCLIP open from a CLIP fine-tune and the scene prior) declares it on its config
class, and `rsray train` trains those stages first when their key says `train`.

    earlier_stages: ClassVar[dict[str, str]] = {"instruction_checkpoint": "instruction_stage"}

A new staged model declares this in its own file; nothing here names a model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from rsray import storage
from rsray.config import Config, load_config
from rsray.models.stages import TRAIN_FIRST
from rsray.train.errors import TrainingFailed


def train_earlier_stages(cfg: Config, train: Callable[[Config], Any]) -> Config:
    """Train the stages a model starts from when its config says so, and point it at their results.

    A model config may declare `earlier_stages = {checkpoint_key: stage_key}` (PriorCLIP:
    {"instruction_checkpoint": "instruction_stage"}). When `model.<checkpoint_key>` is "train",
    the model section of the config file named by `model.<stage_key>` (e.g. model/scene_prior) is
    trained first with this run's data, train and tracking sections, as its own run
    `<run_name>-<stage model>` (Ray Train and MLflow alike), and its best checkpoint by its own
    selection metric becomes `model.<checkpoint_key>`. `train` trains one config and returns its
    `ray.train.Result` (`rsray.train.run.train`; passed in because it calls this). Returns the updated
    copy of `cfg`."""
    from rsray.models import model_config
    from rsray.train.loop import selection_metric

    cfg = copy.deepcopy(cfg)
    for checkpoint_key, stage_key in getattr(model_config(cfg), "earlier_stages", {}).items():
        if cfg.model.get(checkpoint_key) != TRAIN_FIRST:
            continue
        stage_file = load_config(cfg.model[stage_key])
        stage = copy.deepcopy(cfg)
        stage.model = stage_file.model
        stage.origins.update({k: v for k, v in stage_file.origins.items() if k.startswith("model.")})
        stage.train.run_name = f"{cfg.train.run_name}-{stage.model.get('name')}" if cfg.train.run_name else ""
        result = train(stage)
        best = result.get_best_checkpoint(selection_metric(model_config(stage)), "max")
        if best is None:
            raise TrainingFailed(f"stage {stage.model.get('name')} reported no checkpoint for model.{checkpoint_key}")
        cfg.model[checkpoint_key] = f"s3://{best.path}" if storage.is_s3(stage.train.storage_path) else best.path
        cfg.origins[f"model.{checkpoint_key}"] = f"stage {stage.train.run_name or stage.model.get('name')}"
    return cfg

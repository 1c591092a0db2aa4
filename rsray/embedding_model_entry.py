"""The file MLflow logs as the embedding model's code ("models from code"): loading the model runs
this, so nothing is unpickled. See `rsray.logged_model`."""

import mlflow

from rsray.logged_model import EmbeddingModel

mlflow.models.set_model(EmbeddingModel())

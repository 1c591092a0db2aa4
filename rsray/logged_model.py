"""A trained checkpoint as an MLflow model: a pyfunc whose `predict` embeds captions and images.

`predict` takes a DataFrame with a `caption` column (text) and/or an `image` column (the bytes of an
image file: JPEG, PNG, TIFF), one item per row, and returns float32 [rows, D]: each row's embedding,
as the checkpoint's `encode_texts` / `encode_images` give it. A raw caption or image file goes
through what `rsray prepare` and evaluation do to it (the data's vocabulary, stop-word rule and
tokenizer; the prepared size and encoding; the model's eval transform), so the embedding of a
dataset's own file equals the one evaluation computed from the prepared shard.

The model is self-contained: its artifacts are the model's weights and config (a slim checkpoint:
no optimizer state), the preprocessing settings read from the data's manifest, the tokenizer
folder and any architecture folder the config names (a CLIP or BERT layout), and its code is the
rsray package. It is logged as "models from code" (`embedding_model_entry.py`), so loading it
unpickles nothing; weights load with `weights_only=True` as everywhere in rsray.

Only two-tower models are logged (their score is a dot product of the embeddings); DOVE scores
pairs and has no single embedding per caption.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

log = logging.getLogger("rsray.logged_model")

MODEL_NAME = "model"  # the logged model's name inside its run
PREPROCESS = "preprocess"  # artifact key of the preprocessing settings (a JSON file)
CHECKPOINT = "checkpoint"  # artifact key of the slim checkpoint folder
FOLDER_PREFIX = "folder:"  # artifact keys of bundled folders: "folder:model.text_checkpoint"
ENTRY = Path(__file__).with_name("embedding_model_entry.py")
# What `predict` imports, pinned to the versions that trained the model (MLflow records them).
REQUIREMENTS = ("torch", "torchvision", "timm", "transformers", "pillow", "pyarrow", "numpy", "pandas", "pyyaml")
ROW_BATCH = 64


with warnings.catch_warnings():  # MLflow asks for type hints at class creation; rows are validated here
    warnings.simplefilter("ignore", UserWarning)

    class EmbeddingModel(mlflow.pyfunc.PythonModel):
        """The pyfunc's model (`mlflow.pyfunc.PythonModel` interface): loads the slim checkpoint and the
        preprocessing once, then embeds DataFrame rows in batches."""

        def load_context(self, context: Any) -> None:
            self.load(context.artifacts)

        def load(self, artifacts: dict[str, str]) -> None:
            """Build from artifact paths: {"checkpoint": folder, "preprocess": json, "folder:KEY": folder}."""
            from rsray.checkpoint import read_checkpoint
            from rsray.config import config_from_dict
            from rsray.data.augment import eval_transform
            from rsray.data.text import Vocabulary, load_tokenizer
            from rsray.models import model_config
            from rsray.models.registry import build_for_loading

            state, saved = read_checkpoint(artifacts[CHECKPOINT])
            for key, path in artifacts.items():  # architecture folders travel with the model
                if key.startswith(FOLDER_PREFIX):
                    _set_dotted(saved, key[len(FOLDER_PREFIX) :], path)
            cfg = config_from_dict(saved, source=f"{artifacts[CHECKPOINT]}/config.yaml")
            self.settings = json.loads(Path(artifacts[PREPROCESS]).read_text())
            self.vocab = Vocabulary.from_dict(self.settings["vocab"])
            tokenizer = artifacts.get(f"{FOLDER_PREFIX}data.tokenizer") or self.settings.get("tokenizer")
            self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
            self.model = build_for_loading(cfg, len(self.vocab))
            self.model.load_state_dict(state["model"])
            self.model.eval()
            self.transform = eval_transform(model_config(cfg).augment)

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate by them
            """float32 [rows, D]: row i's caption or image embedded (exactly one of them per row)."""
            import torch

            rows = list(_items(model_input))
            out: list[torch.Tensor | None] = [None] * len(rows)
            with torch.no_grad():
                for kind, encode in (("caption", self._captions), ("image", self._images)):
                    positions = [i for i, (k, _) in enumerate(rows) if k == kind]
                    for start in range(0, len(positions), ROW_BATCH):
                        chunk = positions[start : start + ROW_BATCH]
                        for i, embedding in zip(chunk, encode([rows[i][1] for i in chunk], chunk), strict=True):
                            out[i] = embedding
            if not rows:
                return np.zeros((0, 0), np.float32)
            return torch.stack(out).float().numpy()

        def _captions(self, captions: list[str], numbers: list[int]):
            from rsray.data.loader import collate_pairs

            samples = []
            for caption in captions:
                sample = {"tokens": self.vocab.encode(caption), "image_index": 0, "scene_id": -1}
                if self.tokenizer is not None:
                    sample["input_ids"] = self.tokenizer(caption)["input_ids"]
                samples.append(sample)
            return self.model.encode_texts(collate_pairs(samples))

        def _images(self, files: list[bytes], numbers: list[int]):
            from rsray.data.images import ImageRejected, decode_image, process_image
            from rsray.data.loader import collate_images

            s = self.settings
            samples = []
            for number, data in zip(numbers, files, strict=True):
                try:
                    prepared = process_image(
                        data, s["image_size"], s["image_encoding"], s["jpeg_quality"], s["max_pixels"]
                    )
                except ImageRejected as exc:  # the row, so a caller of a 500-row frame can find it
                    raise ValueError(f"input row {number}: {exc}") from None
                samples.append({"image": self.transform(decode_image(prepared)), "image_index": 0, "scene_id": -1})
            return self.model.encode_images(collate_images(samples))


def _items(frame: Any) -> Iterator[tuple[str, Any]]:
    """("caption", text) or ("image", bytes) per row; a row with neither or both is refused by number."""
    columns = [c for c in ("caption", "image") if c in frame.columns]
    if not columns:
        raise ValueError(f"input has columns {list(frame.columns)}; expected `caption` (text) and/or `image` (bytes)")
    for number, row in enumerate(frame[columns].itertuples(index=False)):
        present = {c: v for c, v in zip(columns, row, strict=True) if _present(v)}
        if len(present) != 1:
            raise ValueError(
                f"input row {number}: give exactly one of caption or image, got {sorted(present) or 'none'}"
            )
        kind, value = next(iter(present.items()))
        if kind == "caption" and not isinstance(value, str):
            raise ValueError(f"input row {number}: caption must be text, got {type(value).__name__}")
        if kind == "image" and not isinstance(value, (bytes, bytearray)):
            raise ValueError(
                f"input row {number}: image must be the bytes of an image file, got {type(value).__name__}"
            )
        yield kind, bytes(value) if kind == "image" else value


def _present(value: Any) -> bool:
    if value is None:
        return False
    try:
        return not bool(np.isnan(value))
    except (TypeError, ValueError):
        return True


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree[leaf] = value


# ----------------------------------------------------------------------------- writing


def preprocess_settings(manifest: dict) -> dict[str, Any]:
    """What turns a raw caption or image file into the model's input, from the data's manifest."""
    from rsray.config import PrepareConfig

    prepare = {**PrepareConfig().__dict__, **(manifest.get("config", {}).get("prepare") or {})}
    return {
        "dataset": manifest.get("dataset"),
        "vocab": manifest["vocab"],
        "tokenizer": manifest.get("tokenizer"),
        "image_size": int(manifest.get("image_size", prepare["image_size"])),
        "image_encoding": manifest.get("image_encoding", prepare["image_encoding"]),
        "jpeg_quality": int(prepare["jpeg_quality"]),
        "max_pixels": int(prepare["max_image_pixels"]),
    }


def architecture_folders(saved: dict) -> dict[str, str]:
    """{dotted key: local folder} of the config's folders that define the model or its tokenizer
    (read again at load); files that gave only initial weights are not needed (`build_for_loading`)."""
    from rsray.models.registry import initial_weight_keys

    initial = initial_weight_keys((saved.get("model") or {}).get("name", ""))
    found: dict[str, str] = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{dotted}.")
            elif isinstance(value, str) and key not in initial and Path(value).is_dir():
                found[dotted] = value

    walk(saved.get("model") or {}, "model.")
    tokenizer = (saved.get("data") or {}).get("tokenizer")
    if isinstance(tokenizer, str) and Path(tokenizer).is_dir():
        found["data.tokenizer"] = tokenizer
    return found


def write_artifacts(checkpoint_folder: str | Path, manifest: dict, into: Path) -> dict[str, str]:
    """The pyfunc's artifacts under `into`: the slim checkpoint (weights, epoch, run id, config) and
    the preprocessing settings. Returns MLflow's {key: path} (bundled folders included)."""
    import torch

    from rsray.checkpoint import CONFIG_FILE, STATE_FILE, load_state

    checkpoint_folder = Path(checkpoint_folder)
    state = load_state(checkpoint_folder / STATE_FILE)
    slim = into / CHECKPOINT
    slim.mkdir(parents=True)
    kept = {k: state[k] for k in ("model", "epoch", "mlflow_run_id") if k in state}
    torch.save(kept, slim / STATE_FILE)
    shutil.copy(checkpoint_folder / CONFIG_FILE, slim / CONFIG_FILE)
    (into / "preprocess.json").write_text(json.dumps(preprocess_settings(manifest)))
    import yaml

    saved = yaml.safe_load((slim / CONFIG_FILE).read_text())
    artifacts = {CHECKPOINT: str(slim), PREPROCESS: str(into / "preprocess.json")}
    artifacts.update({f"{FOLDER_PREFIX}{key}": path for key, path in architecture_folders(saved).items()})
    return artifacts


def signature(embed_dim: int):
    """Input: optional `caption` (string) and `image` (binary) columns; output: float32 [-1, D]."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", "caption", required=False), ColSpec("binary", "image", required=False)])
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))]))


def pip_requirements() -> list[str]:
    """This environment's versions of what `predict` imports (rsray itself travels as code)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def embed_dim_of(artifacts: dict[str, str]) -> int:
    """D of the model: one caption embedded by the model as it will be served."""
    model = EmbeddingModel()
    model.load(artifacts)
    import pandas as pd

    return int(model.predict(None, pd.DataFrame({"caption": ["a"]})).shape[1])


def log_embedding_model(
    tracker: Any, checkpoint_folder: str | Path, manifest: dict, cfg: Any
) -> tuple[str | None, str | None]:
    """Log the checkpoint as the run's MLflow model (MLflow 3: a LoggedModel linked to the run) and,
    with `tracking.register_as`, register it with its alias. Returns (model id, `models:/NAME@ALIAS`
    when registered); None for what was not done: the model scores pairs, or the store did not
    take it (collected by the tracker)."""
    import mlflow
    import pandas as pd

    from rsray.models import model_config
    from rsray.models.registry import model_class
    from rsray.redact import without_credentials
    from rsray.tracking import mlflow_client

    if not model_class(cfg).two_tower:
        log.info("no MLflow model logged: %s scores pairs and has no embedding per item", cfg.model.get("name"))
        return None, None
    model_config(cfg)  # the config is checked before anything is written
    with tempfile.TemporaryDirectory(prefix="rsray-model-") as tmp:
        artifacts = write_artifacts(checkpoint_folder, manifest, Path(tmp))
        dim = embed_dim_of(artifacts)
        mlflow_client(tracker.uri)  # credentials in the URI move into MLflow's variables
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(without_credentials(tracker.uri))  # the fluent API logs models

        def log_model() -> str:
            with mlflow.start_run(run_id=tracker.run_id):  # the run is ended by its owner afterwards
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME,
                    python_model=str(ENTRY),
                    artifacts=artifacts,
                    code_paths=[str(Path(__file__).parent)],
                    signature=signature(dim),
                    input_example=pd.DataFrame({"caption": ["many green trees are around a pond"]}),
                    pip_requirements=pip_requirements(),
                    tags={"model": str(cfg.model.get("name", "")), "dataset": str(cfg.data.name)},
                )
            return info.model_id

        name = getattr(cfg.tracking, "register_as", "")
        try:
            model_id = tracker.retried("log model", log_model)
            # inside the same URI: a local store checks the version's source against MLflow's global
            # URI (measured with SQLite: "Logged model ... not found" otherwise)
            registered = register(tracker, model_id, name, registry_alias(cfg)) if model_id and name else None
        finally:
            mlflow.set_tracking_uri(previous)
    return model_id, registered


def registry_alias(cfg: Any) -> str:
    """`tracking.register_alias`, else `<model>-<dataset>` (letters, digits, _ and - only)."""
    import re

    alias = getattr(cfg.tracking, "register_alias", "") or f"{cfg.model.get('name', 'model')}-{cfg.data.name}"
    return re.sub(r"[^\w\-]", "_", alias)


def register(tracker: Any, model_id: str, name: str, alias: str) -> str | None:
    """A new version of registered model `name` from the logged model, and `alias` pointing at it:
    `models:/NAME@ALIAS`, or None when the registry did not take it."""
    from mlflow.exceptions import MlflowException

    from rsray.tracking import mlflow_client

    def register_version() -> str:
        client = mlflow_client(tracker.uri)
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # a later version of the same name is fine
                raise
        model = client.get_logged_model(model_id)
        version = client.create_model_version(name, model.model_uri, run_id=tracker.run_id, model_id=model_id)
        client.set_registered_model_alias(name, alias, version.version)
        return version.version

    version = tracker.retried(f"register {name}", register_version)
    if not version:
        return None
    log.info("registered as models:/%s@%s (version %s)", name, alias, version)
    return f"models:/{name}@{alias}"


def download_model(uri: str, tracking_uri: str, into: str | Path) -> str:
    """`models:/NAME@ALIAS` (or `models:/NAME/VERSION`, `models:/<model id>`)
    downloaded under `into` -> the slim checkpoint folder inside it, which `rsray evaluate` scores
    as any other. The URI is resolved against `tracking_uri` itself (MLflow would resolve a
    models:/ URI against the process's global registry URI, whatever `tracking_uri` says)."""
    import mlflow.artifacts

    from rsray.redact import without_credentials
    from rsray.tracking import check_reachable, mlflow_client

    check_reachable(tracking_uri)
    client = mlflow_client(tracking_uri)  # credentials in the URI move into MLflow's variables
    address = without_credentials(tracking_uri)
    try:
        location = artifact_location(client, uri)
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(into), tracking_uri=address)
        )
    except Exception as exc:
        raise FileNotFoundError(f"{uri}: cannot be read from {address} ({_line(exc)})") from None
    found = sorted(local.rglob(f"artifacts/{CHECKPOINT}/state.pt"))
    if not found:
        raise FileNotFoundError(f"{uri}: not an rsray model (no artifacts/{CHECKPOINT}/state.pt inside)")
    return str(found[0].parent)


def artifact_location(client: Any, uri: str) -> str:
    """Where a model URI's files are, asked of `client`'s own server: a logged model's artifact
    location for models:/<model id>, NAME@ALIAS and NAME/VERSION. (MLflow 3 keeps a logged model
    outside its run's artifacts: `runs:/<run id>/model` finds nothing there, measured.)"""
    if not uri.startswith("models:/"):
        return uri
    reference = uri[len("models:/") :].rstrip("/")
    if reference.startswith("m-") and "/" not in reference and "@" not in reference:
        return client.get_logged_model(reference).artifact_location
    if "@" in reference:
        name, alias = reference.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = reference.rpartition("/")
        version = client.get_model_version(name, number)
    source = version.source
    if source.startswith("models:/m-"):
        return client.get_logged_model(source[len("models:/") :]).artifact_location
    return source


def _line(exc: BaseException) -> str:
    from rsray.redact import redact

    return redact(" ".join(str(exc).split()))[:200]

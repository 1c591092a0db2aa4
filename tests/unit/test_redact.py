"""Credentials are recognised inside URIs and by key name, and hidden everywhere rsray writes."""

from __future__ import annotations

import logging
import os

import pytest

from rsray.config import load_config
from rsray.redact import (
    RedactingFilter,
    is_secret,
    redact,
    redact_config_text,
    redact_tree,
    split_credentials,
    without_credentials,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("http://alice:pw@host:5000/x", "http://alice:***@host:5000/x"),
        ("see https://tok123@github.com/o/r.git now", "see https://***@github.com/o/r.git now"),
        ("postgresql+psycopg://u:p%40ss@db/mlflow", "postgresql+psycopg://u:***@db/mlflow"),
        ("s3://bucket/key?X-Amz-Signature=abc&x=1", "s3://bucket/key?X-Amz-Signature=***&x=1"),
        ("http://h/api?token=abc&page=2", "http://h/api?token=***&page=2"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http://u:p@ss@host/x", "http://u:***@host/x"),  # an unencoded @ in the password
        ("user@example.com wrote sqlite:///mlflow.db", "user@example.com wrote sqlite:///mlflow.db"),
    ],
)
def test_redact_hides_uri_credentials_and_secret_query_values(text, expected):
    assert redact(text) == expected


def test_secret_keys_are_whole_words_or_known_parts():
    for key in ("password", "aws_secret_access_key", "hf_token", "AWS_ACCESS_KEY_ID", "api_key", "db-credentials"):
        assert is_secret(key), key
    for key in ("tokenizer", "max_tokens", "keep_checkpoints", "uri", "key"):
        assert not is_secret(key), key


def test_redact_tree_masks_secret_keys_and_uris_at_any_depth():
    tree = {"tracking": {"uri": "http://u:pw@h"}, "model": {"hf_token": "abc", "layers": [1, "http://x:y@z"]}}
    assert redact_tree(tree) == {
        "tracking": {"uri": "http://u:***@h"},
        "model": {"hf_token": "***", "layers": [1, "http://x:***@z"]},
    }
    assert tree["tracking"]["uri"] == "http://u:pw@h"  # a copy: the process keeps the real value


def test_split_credentials_gives_the_address_and_the_unquoted_login():
    assert split_credentials("http://alice:p%40ss@host:5000/a") == ("http://host:5000/a", ("alice", "p@ss"))
    assert split_credentials("http://host:5000") == ("http://host:5000", None)
    assert without_credentials("https://t@h/x") == "https://h/x"


def test_a_saved_config_reloads_with_the_password_hidden(tmp_path):
    cfg = load_config("presets/cpu-tiny", ["tracking.uri=http://me:hunter2@127.0.0.1:5000"])
    cfg.save(tmp_path / "config.yaml")
    assert "hunter2" not in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml").tracking.uri == "http://me:***@127.0.0.1:5000"
    assert cfg.tracking.uri == "http://me:hunter2@127.0.0.1:5000"


def test_the_logging_filter_redacts_formatted_messages():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "run at %s", ("http://a:b@h",), None)
    assert RedactingFilter().filter(record) and record.getMessage() == "run at http://a:***@h"


def test_config_text_hides_secret_keys_and_uri_credentials():
    text = "tracking:\n  uri: http://u:pw@h  # ours\n  password: hunter2\nmodel:\n  hf_token=abc\n  tokenizer: bert\n"
    assert redact_config_text(text) == (
        "tracking:\n  uri: http://u:***@h  # ours\n  password: ***\nmodel:\n  hf_token=***\n  tokenizer: bert\n"
    )


def test_mlflow_gets_the_bare_address_and_the_login_through_its_variables(monkeypatch, tmp_path):
    from rsray.tracking import mlflow_client

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert mlflow_client("http://me:***@127.0.0.1:1")._tracking_client.tracking_uri == "http://127.0.0.1:1"
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ  # a redacted password is no password
    mlflow_client("http://me:s3cret@127.0.0.1:1")
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("me", "s3cret")
    database = f"sqlite:///{tmp_path}/x.db"  # a database URI is passed on whole
    assert mlflow_client(database)._tracking_client.tracking_uri == database

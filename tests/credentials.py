"""The secrets of the test session: the logins of its MLflow server (basic-auth, tests/conftest.py
`mlflow_server`), the S3 secret key of moto's server (`s3_endpoint`) and the token of every Ray
cluster the tests start (`ray_token_auth`). Tests search everything rsray printed, logged or wrote
for them. rsray gets the user's MLflow password through MLFLOW_TRACKING_PASSWORD (set for the
whole session) or, in the sweep's config, inside the tracking URI."""

import secrets

USER = "rsray-user"
PASSWORD = "pw-Zq81-never-shown"
ADMIN = ("rsray-admin", f"admin-{secrets.token_hex(8)}")  # only the fixtures use it
S3_SECRET_KEY = "s3-secret-Wv47-never-shown"
RAY_TOKEN = f"ray-token-{secrets.token_hex(16)}"  # every Ray the tests start requires it (RAY_AUTH_MODE=token)


def with_password(uri: str) -> str:
    """`http://host:port` -> `http://rsray-user:<PASSWORD>@host:port` (checked by the server)."""
    return uri.replace("http://", f"http://{USER}:{PASSWORD}@")

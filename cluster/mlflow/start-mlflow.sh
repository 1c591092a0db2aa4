#!/bin/sh
# Starts `mlflow server` with MLflow's basic-auth app: nothing is served without a login. The
# image's entrypoint; the tests' MLflow server runs it too (tests/conftest.py).
#
# Every secret comes from the environment (a Kubernetes Secret, an env file): the admin account
# (MLFLOW_AUTH_ADMIN_USERNAME, default "admin", and MLFLOW_AUTH_ADMIN_PASSWORD: MLflow creates it
# on first start), the CSRF key (MLFLOW_FLASK_SERVER_SECRET_KEY) and the database of users and
# permissions (MLFLOW_AUTH_DB_URI). The auth settings file MLflow reads is written here, at start,
# into a private temporary file, so no file in the image or the repository holds a secret.
# MLFLOW_AUTH_DEFAULT_PERMISSION (default EDIT) is what every logged-in user may do with runs
# they did not create; READ makes each user's experiments their own.
#
# Arguments are passed to `mlflow server` (backend store, artifacts, host, port, workers).
set -eu
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (the admin account MLflow creates)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (any long random string, the same for every replica)}"
: "${MLFLOW_AUTH_DB_URI:?set MLFLOW_AUTH_DB_URI (the database of MLflow users, e.g. postgresql://.../mlflow_auth)}"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
# MLflow's job runner (GenAI judges, trace rollups) is on by default and starts eight more processes
# (a runner and seven huey consumers, about 235 MB and 2 s of CPU each, measured here); rsray uses
# none of its jobs. Set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

umask 077
settings="$(mktemp "${TMPDIR:-/tmp}/mlflow-basic-auth.XXXXXX")"
cat > "$settings" <<SETTINGS
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-EDIT}
database_uri = ${MLFLOW_AUTH_DB_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# a login's password hash (PBKDF2) is checked once a minute, not on every logged metric
auth_cache_ttl_seconds = 60
SETTINGS
export MLFLOW_AUTH_CONFIG_PATH="$settings"
exec mlflow server --app-name basic-auth "$@"

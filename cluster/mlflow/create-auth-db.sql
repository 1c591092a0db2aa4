-- Run once by the postgres image on an empty data folder (docker-compose.yaml): the database of
-- MLflow's users and permissions, next to the tracking database and owned by the same role.
CREATE DATABASE mlflow_auth OWNER mlflow;

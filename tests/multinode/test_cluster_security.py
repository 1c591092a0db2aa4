"""A Ray cluster no one else can use: the two-node cluster runs with token authentication (as
cluster/ sets Ray up), so its job API refuses a submission without the token or with a wrong one,
and runs `rsray` for a client that has it (here from RAY_AUTH_TOKEN, as a user's shell would)."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _submit_without_the_token(url: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(
        f"{url}/api/jobs/",
        data=json.dumps({"entrypoint": "echo anyone can run code here"}).encode(),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def _submit(client, entrypoint: str, timeout: float = 300) -> str:
    """Submit once the head's job agent is up: right after a cluster starts, and under load, Ray
    answers 500 "No available agent to submit job, please try again later" for a while (over 120 s
    once, with the integration package training beside it under `-n 2`)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_the_job_api_refuses_a_job_without_the_token_and_runs_rsray_with_it(ray_nodes, prepared_on_nodes):
    from ray.job_submission import JobStatus, JobSubmissionClient

    url = ray_nodes.dashboard_url
    assert _submit_without_the_token(url, {}) == (401, "Unauthorized: Missing authentication token")
    code, _ = _submit_without_the_token(url, {"Authorization": "Bearer not-the-token"})
    assert code == 403

    assert os.environ["RAY_AUTH_TOKEN"]  # the client sends it; the job's driver inherits the cluster's
    client = JobSubmissionClient(url)
    rsray = Path(sys.executable).parent / "rsray"  # this environment's, as on a cluster's image
    job = _submit(client, f"{rsray} data inspect {prepared_on_nodes}")
    deadline = time.monotonic() + 120
    while not (status := client.get_job_status(job)).is_terminal():
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "rsray_sample" in logs and "train" in logs, logs[-3000:]

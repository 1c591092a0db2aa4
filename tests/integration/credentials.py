"""A password placed in the tracking URIs of the shared training run and the sweep: tests search
everything rsray printed, logged or wrote for it."""

PASSWORD = "pw-Zq81-never-shown"


def with_password(uri: str) -> str:
    """`http://host:port` -> `http://rsray-user:<PASSWORD>@host:port` (a server without MLflow's
    basic-auth app ignores the credentials; one with it would check them)."""
    return uri.replace("http://", f"http://rsray-user:{PASSWORD}@")

"""Check the MLflow UI in a real browser and take the screenshots the docs show (docs/images/).

Starts `mlflow server` on 127.0.0.1 over a tracking store (the `make demo` experiment by default),
opens the link rsray prints (the experiment's training view, `?workflowType=machine_learning`) in
headless Chromium, adds the test columns to the runs table, and checks that every finished
training run shows its `test/mR` as MLflow holds it; then opens the compare run's mR figure. The
shots go to docs/images/. Not part of `make test` (it needs a browser):

    apt-get install chromium            # Debian's; nothing is downloaded by Playwright
    python -m venv /tmp/ui && /tmp/ui/bin/pip install playwright==1.65.2
    /tmp/ui/bin/python tools/mlflow_ui_check.py --store sqlite:///$PWD/mlflow.db

Exit code 0 when every check passed; each check prints one line.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def start_server(store: str, mlflow: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [mlflow, "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return server, base
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit(f"mlflow server on {base} did not answer in 120 s")


COLUMNS = ("test/mR", "test_smr/mR", "test/i2t_R1", "test/t2i_R1")


def _shown(value: float) -> str:
    """The start of a metric as the runs table prints it (the full float, cut with an ellipsis)."""
    return repr(float(value))[:5]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=f"sqlite:///{ROOT / 'mlflow.db'}", help="backend store URI")
    parser.add_argument("--experiment", default="rsray")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--mlflow", default=str(ROOT / ".venv" / "bin" / "mlflow"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    ns = parser.parse_args()
    from playwright.sync_api import sync_playwright

    server, base = start_server(ns.store, ns.mlflow)
    failures = 0

    def check(ok: bool, what: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {what}")

    try:
        experiment = api(base, f"experiments/get-by-name?experiment_name={ns.experiment}")["experiment"]
        runs = api(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 200})["runs"]
        metrics = {r["info"]["run_name"]: {m["key"]: m["value"] for m in r["data"].get("metrics", [])} for r in runs}
        tags = {r["info"]["run_name"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
        trained = {name: m["test/mR"] for name, m in metrics.items() if "test/mR" in m}
        compare = [r for r in runs if tags[r["info"]["run_name"]].get("rsray.kind") == "compare"]
        link = f"{base}/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning"
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=ns.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1760, "height": 600}, device_scale_factor=1)
            page.goto(link)
            first = next(iter(trained))
            page.get_by_text(first, exact=True).first.wait_for(timeout=60_000)
            check("workflowType=machine_learning" in page.url, f"the printed link opens the training view ({link})")
            for name in trained:
                check(page.get_by_text(name, exact=True).count() > 0, f"run {name} is listed")
            close = page.get_by_role("button", name="Close", exact=True)
            if close.count():  # MLflow 3.17's assistant panel: closed for a wider table
                close.first.click()
            page.get_by_role("button", name="Columns", exact=True).first.click()
            for key in ("Source", *COLUMNS):  # Source ("-" here) off, the test numbers on
                page.get_by_placeholder("Search columns").fill(key)
                menu = page.locator("[data-radix-popper-content-wrapper]").last
                menu.get_by_text(key, exact=True).first.click()  # "test/i2t_R1" before "test/i2t_R10"
            page.keyboard.press("Escape")
            page.wait_for_timeout(1500)
            headers = page.get_by_role("columnheader").all_inner_texts()
            for key in COLUMNS:
                check(key in headers, f"column {key} is shown")
            rows = {}  # the grid splits a row into its pinned and scrolling parts: joined by row-index
            for name in trained:
                index = page.get_by_role("row").filter(has_text=name).first.get_attribute("row-index")
                rows[name] = " ".join(page.locator(f"[role=row][row-index='{index}']").all_inner_texts())
            for name, value in trained.items():
                check(_shown(value) in rows[name], f"{name}: its row shows test/mR {value:.2f} ({_shown(value)}...)")
            page.screenshot(path=str(out / "mlflow-runs.png"))
            print(f"wrote {out / 'mlflow-runs.png'}")
            if compare:
                run = compare[-1]
                page.goto(
                    f"{base}/#/experiments/{experiment['experiment_id']}/runs/{run['info']['run_id']}"
                    "/artifacts/figures/compare_mR.png?workflowType=machine_learning"
                )
                image = page.locator("img[src^='blob:']").first
                image.wait_for(timeout=60_000)
                check(image.evaluate("i => i.naturalWidth > 0"), "the compare run's mR figure is shown")
                check(
                    "Evaluations" not in page.inner_text("nav, header, body")[:400],
                    "the run page opens in the training view",
                )
                close = page.get_by_role("button", name="Close", exact=True)
                if close.count():
                    close.first.click()
                page.screenshot(path=str(out / "mlflow-compare.png"))
                print(f"wrote {out / 'mlflow-compare.png'}")
            else:
                check(False, "the experiment has a compare run")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{failures} check(s) failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

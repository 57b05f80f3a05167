# Shoal: the two commands a newcomer needs are `make demo` and `make test`.
# Everything else here is a step of those two.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
export GOTOOLCHAIN := local
SHOAL_CACHE ?= $(HOME)/.cache/shoal
export SHOAL_CACHE
KUBE_BIN := $(SHOAL_CACHE)/bin/current
export KUBECONFIG := $(CURDIR)/target/cluster/kubeconfig
# Cargo's build directory: target/ unless set. .ci/run points it outside the clone,
# keyed by toolchain and Cargo.lock, so CI on a fresh clone reuses compiled crates.
CARGO_TARGET_DIR ?= $(CURDIR)/target
export CARGO_TARGET_DIR
export PATH := $(KUBE_BIN):$(PATH)

.PHONY: all deps python-env build test demo demo-down lint fmt crds crds-check cluster-build cluster-up cluster-down \
        test-models unit-test integration-test clean example-model chart-check

all: build

build:
	cargo build --workspace --bins

## crds: regenerate crds/ (and the chart's copy) from the Rust types in api/
crds:
	cargo run -q -p shoal-operator -- crd > crds/shoal.dev.yaml
	cp crds/shoal.dev.yaml charts/shoal/crds/shoal.dev.yaml

## crds-check: fail if crds/ drifted from api/
crds-check:
	@cargo run -p shoal-operator -- crd | diff -u crds/shoal.dev.yaml - \
	  || { echo "crds/ is out of date: run 'make crds' and commit the result" >&2; exit 1; }

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

## deps: Debian packages the scripts use, installed only when missing
deps:
	@missing=(); for tool in openssl curl; do command -v $$tool >/dev/null || missing+=($$tool); done; \
	  if (($${#missing[@]})); then echo "Installing $${missing[*]} with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$${missing[@]}"; fi
	@command -v promtool >/dev/null || { echo "Installing promtool (Debian package prometheus) with apt-get for the chart's alert checks"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; }
	@missing=(); for pkg in musl-tools gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static skopeo ca-certificates containerd file; do \
	    dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q 'ok installed' || missing+=($$pkg); done; \
	  if (($${#missing[@]})); then echo "Installing $${missing[*]} with apt-get for make images"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$${missing[@]}" >/dev/null; fi
	@installed=$$(rustup target list --installed); for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do \
	    grep -qx $$target <<<"$$installed" || { echo "Adding the Rust target $$target for make images"; rustup target add $$target; }; done
	@command -v go >/dev/null || { echo "Go is required (go 1.24 or newer) to build the local control plane" >&2; exit 1; }
	@python3 -m pip --version >/dev/null || { echo "python3 with pip is required to fetch the test models from PyPI" >&2; exit 1; }

cluster-build: deps
	tests/cluster/build.sh

cluster-up: deps
	tests/cluster/up.sh

cluster-down:
	tests/cluster/down.sh

# The real node (tests/cluster/node-up.sh): kubelet, containerd + runc, CNI bridge,
# kube-proxy and CoreDNS beside the kwok nodes. Its Debian packages, when missing:
NODE_DEBS := containerd:containerd runc:runc iptables:iptables conntrack:conntrack socat:socat \
  /usr/lib/cni/bridge:containernetworking-plugins umoci:umoci skopeo:skopeo musl-gcc:musl-tools \
  /bin/busybox:busybox-static

.PHONY: node-deps node-up node-down node-check
## node-deps: Debian packages of the real node (and of node-check's test images), installed only when missing
node-deps:
	@missing=(); for pair in $(NODE_DEBS); do tool=$${pair%%:*}; \
	  if [[ $$tool == /* ]]; then [[ -x $$tool ]] || missing+=($${pair#*:}); \
	  else command -v $$tool >/dev/null || missing+=($${pair#*:}); fi; done; \
	  ldd /bin/busybox >/dev/null 2>&1 && missing+=(busybox-static); \
	  if (($${#missing[@]})); then echo "Installing $${missing[*]} with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$${missing[@]}" >/dev/null; fi

## node-up: a real node, shoal-node-0 (label shoal.dev/node=real), beside the kwok nodes; starts the control plane if needed
node-up: deps node-deps
	tests/cluster/node-up.sh

## node-down: stop the real node and remove what it created (cluster-down does it too)
node-down:
	tests/cluster/node-down.sh

## node-check: a pod, a Service, DNS, the API server from a pod and kubectl logs on the real node
node-check: node-up
	tests/cluster/node-check.sh

## node-test: Shoal on the real node (tests/tests/real_node.rs): the images imported, the chart
## installed with helm, an agent pod serving through its Service, a rollout, container kill,
## containerd restart, operator pod deleted, token replay. Prints target/node/figures.md.
.PHONY: node-test
node-test: build images node-up
	@source tests/cluster/node-common.sh; \
	  printf 'NODE_NAME=%s\nNODE_IP=%s\nNODE_LABEL=%s\nCONTAINERD_ADDRESS=%s\nKUBELET_ROOT=%s\n' \
	    "$$node_name" "$$node_ip" "$$node_labels" "$$containerd_sock" "$$kubelet_root" >target/node/node.env
	cargo test -p shoal-tests --features real-node --test real_node -- --nocapture

test-models:
	@tests/models/fetch.sh >/dev/null

# A Python with onnxruntime, the reference the agent's outputs are checked against
# (and, later, the KServe peer of the benchmarks). Cached outside the repo by version.
ONNXRUNTIME_VERSION := 1.32.0
NUMPY_VERSION := 2.4.6
ONNX_VERSION := 1.23.2
PYTHON_ENV := $(SHOAL_CACHE)/python/onnxruntime-$(ONNXRUNTIME_VERSION)-numpy-$(NUMPY_VERSION)-onnx-$(ONNX_VERSION)
export SHOAL_PYTHON := $(PYTHON_ENV)/bin/python

python-env: $(SHOAL_PYTHON)
$(SHOAL_PYTHON):
	@echo "Creating $(PYTHON_ENV) with onnxruntime $(ONNXRUNTIME_VERSION) from PyPI"
	python3 -m venv $(PYTHON_ENV).tmp
	$(PYTHON_ENV).tmp/bin/pip install --quiet --disable-pip-version-check \
	  onnxruntime==$(ONNXRUNTIME_VERSION) numpy==$(NUMPY_VERSION) onnx==$(ONNX_VERSION)
	rm -rf $(PYTHON_ENV) && mv $(PYTHON_ENV).tmp $(PYTHON_ENV)

# The example recommendation model (examples/recommender/), trained with numpy on
# MovieLens-100k from the recbole wheel; cached by a hash of the training code.
RECOMMENDER_HASH := $(shell cat examples/recommender/*.py examples/recommender/build.sh | sha256sum | cut -c1-12)
export SHOAL_RECOMMENDER_DIR := $(SHOAL_CACHE)/models/recommender-$(RECOMMENDER_HASH)

## example-model: train the example recommender (about 15 s; cached)
example-model: python-env
	@examples/recommender/build.sh $(SHOAL_RECOMMENDER_DIR) $(SHOAL_PYTHON)

# Real third-party models the tests load, fetched from PyPI wheels by test-models.
export SHOAL_TEST_MAGIKA_ONNX := $(SHOAL_CACHE)/models/magika-1.0.3/model.onnx
export SHOAL_TEST_PPOCR_CLS_ONNX := $(SHOAL_CACHE)/models/rapidocr-onnxruntime-1.4.4/ch_ppocr_mobile_v2.0_cls_infer.onnx
export SHOAL_OPERATOR_BIN := $(CARGO_TARGET_DIR)/debug/shoal-operator
export SHOAL_AGENT_BIN := $(CARGO_TARGET_DIR)/debug/shoal-agent
# The agents-keep-serving test holds the control plane down this long (60 s, the offline time Shoal targets).
export SHOAL_E2E_OFFLINE_SECONDS ?= 60

## unit-test: everything that needs no cluster (unit tests, api/'s schema tests)
unit-test: test-models python-env example-model
	cargo test --workspace --exclude shoal-tests
	cargo test -p shoal-tests --lib

## integration-test: tests against the local control plane (started if needed)
integration-test: build cluster-up test-models
	cargo test -p shoal-tests -- --test-threads 4

## chart-check: lint, render, dry-run, install and RBAC-test charts/shoal on the local control plane
chart-check: build cluster-up test-models
	tests/chart/check.sh

## test: everything CI runs; starts the local control plane and stops it after
test: deps lint crds-check unit-test fuzz-smoke images-check
	@trap 'tests/cluster/down.sh' EXIT; $(MAKE) --no-print-directory integration-test chart-check node-check node-test

## demo: control plane, CRDs, operator, a real model and an EdgePool, end to end
demo: deps build test-models example-model
	examples/demo.sh

clean: cluster-down
	rm -rf target/cluster

## demo-down: stop the demo's traffic, agents, operator and model server, then the control plane
demo-down:
	@echo "Stopping the demo's processes"
	@examples/demo-stop.sh target/demo
	tests/cluster/down.sh

# The Python peer of the benchmark: KServe's ModelServer with onnxruntime, cached by version.
KSERVE_VERSION := 0.21.0
BENCH_PYTHON_ENV := $(SHOAL_CACHE)/python/kserve-$(KSERVE_VERSION)-onnxruntime-$(ONNXRUNTIME_VERSION)-numpy-$(NUMPY_VERSION)
BENCH_PYTHON := $(BENCH_PYTHON_ENV)/bin/python

.PHONY: bench bench-python-env
bench-python-env: $(BENCH_PYTHON)
$(BENCH_PYTHON):
	@echo "Creating $(BENCH_PYTHON_ENV) with kserve $(KSERVE_VERSION) and onnxruntime $(ONNXRUNTIME_VERSION) from PyPI"
	python3 -m venv $(BENCH_PYTHON_ENV).tmp
	$(BENCH_PYTHON_ENV).tmp/bin/pip install --quiet --disable-pip-version-check \
	  kserve==$(KSERVE_VERSION) onnxruntime==$(ONNXRUNTIME_VERSION) numpy==$(NUMPY_VERSION)
	rm -rf $(BENCH_PYTHON_ENV) && mv $(BENCH_PYTHON_ENV).tmp $(BENCH_PYTHON_ENV)

## bench-fleet: 2,000 kwok nodes in 20 pools with simulated agents (and 3 real ones), a
## 10 -> 50 -> 100% rollout; prints target/bench/fleet.md. FLEET_NODES, FLEET_POOLS,
## FLEET_REAL_AGENTS override the size. Takes ~10 minutes; never fails on timing.
.PHONY: bench-fleet
bench-fleet: cluster-up
	cargo build --release -p shoal-operator --bin shoal-operator
	cargo build -p shoal-tests --bin shoal-fleet-bench -p shoal-agent --bin shoal-agent
	SHOAL_OPERATOR_BIN=$(CARGO_TARGET_DIR)/release/shoal-operator $(CARGO_TARGET_DIR)/debug/shoal-fleet-bench

## bench: shoal-agent vs in-process tract vs Python KServe/onnxruntime on magika; prints
## a table (also target/bench/agent.md). Reports numbers, never fails on timing.
## Then compression: fp32/fp16/int8 of three models (also target/bench/compression.md).
bench: test-models example-model
	cargo build --release -p shoal-agent --bin shoal-agent --example loadgen
	cargo build --release -p shoal-operator --bin shoal-operator
	cargo build --profile release-small -p shoal-agent --bin shoal-agent
	@mkdir -p target/bench
	@$(MAKE) --no-print-directory bench-python-env >target/bench/kserve-install.log 2>&1 \
	  || echo "KServe environment could not be installed; see target/bench/kserve-install.log" >&2
	BENCH_PYTHON=$(BENCH_PYTHON) bench/agent.sh
	bench/compression.sh

# Container images without a Docker engine. `make images` cross-builds static musl
# binaries of shoal-agent and shoal-operator for amd64 and arm64 (one cargo run per
# arch, profile `image`: release-small with thin LTO, see Cargo.toml) and writes each
# image with tools/oci-image as an OCI image-layout archive in target/images/: the
# same files, user, entrypoint, env, ports and labels as Dockerfile.agent and
# Dockerfile.operator on distroless/static, in one deterministic layer (dated by the
# commit time). `ctr images import`, k3s's air-gap images folder and
# `skopeo copy oci-archive:target/images/shoal-agent-arm64.tar docker://…` take them.
# Also the local kubelet's pause image, Kubernetes' pause.c built with musl-gcc.
# The Dockerfiles stay for people with Docker: `make docker-images`.
# Cold build on 2 cores: amd64 + arm64 ~22 + ~26 min with release-small (fat LTO),
# see the report of the image profile for its figures.
IMAGE_REPO ?= ghcr.io/shoal-dev
VERSION ?= $(shell awk -F'"' '/^\[workspace\.package\]/{p=1; next} /^\[/{p=0} p && /^version *=/{print $$2; exit}' Cargo.toml)
IMAGE_REVISION = $(shell git rev-parse HEAD)
IMAGE_EPOCH = $(or $(SOURCE_DATE_EPOCH),$(shell git log -1 --format=%ct))
IMAGE_PROFILE ?= image
IMAGE_DIR := $(CURDIR)/target/images
IMAGE_TOOL := $(CARGO_TARGET_DIR)/debug/shoal-oci-image
# The C code of ring and tract-linalg is built by the cc crate: musl-gcc on amd64;
# on arm64 Debian's cross gcc (no aarch64 musl-gcc in Debian), whose output links
# statically with the musl that Rust's target ships.
MUSL_TRIPLE.amd64 := x86_64-unknown-linux-musl
MUSL_TRIPLE.arm64 := aarch64-unknown-linux-musl
MUSL_ENV.amd64 := CC_x86_64_unknown_linux_musl=musl-gcc
MUSL_ENV.arm64 := CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar \
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
musl-build = $(MUSL_ENV.$(1)) cargo build --locked --profile $(IMAGE_PROFILE) --target $(MUSL_TRIPLE.$(1)) \
  -p shoal-agent --bin shoal-agent -p shoal-operator --bin shoal-operator
musl-bin = $(CARGO_TARGET_DIR)/$(MUSL_TRIPLE.$(1))/$(IMAGE_PROFILE)/$(2)
IMAGE_COMMON = --source-date-epoch $(IMAGE_EPOCH) --accounts --tmp --ca-certificates /etc/ssl/certs/ca-certificates.crt \
  --user 65532:65532 --label org.opencontainers.image.source=https://github.com/shoal-dev/shoal \
  --label org.opencontainers.image.version=$(VERSION) --label org.opencontainers.image.revision=$(IMAGE_REVISION) \
  --label org.opencontainers.image.licenses=Apache-2.0
agent-image = $(IMAGE_TOOL) build $(IMAGE_COMMON) --arch $(1) --output $(IMAGE_DIR)/shoal-agent-$(1).tar \
  --reference $(IMAGE_REPO)/shoal-agent:$(VERSION) --binary $(call musl-bin,$(1),shoal-agent)=/usr/local/bin/shoal-agent \
  --entrypoint /usr/local/bin/shoal-agent --env SHOAL_AGENT_LISTEN=0.0.0.0:8000 --port 8000 \
  --label org.opencontainers.image.title=shoal-agent \
  --label "org.opencontainers.image.description=Shoal edge agent: serves ONNX models over the Open Inference Protocol v2 on edge Kubernetes nodes"
operator-image = $(IMAGE_TOOL) build $(IMAGE_COMMON) --arch $(1) --output $(IMAGE_DIR)/shoal-operator-$(1).tar \
  --reference $(IMAGE_REPO)/shoal-operator:$(VERSION) --binary $(call musl-bin,$(1),shoal-operator)=/usr/local/bin/shoal-operator \
  --dir /var/lib/shoal/artifacts:65532:65532 --entrypoint /usr/local/bin/shoal-operator --cmd run \
  --env SHOAL_METRICS_ADDR=0.0.0.0:8080 --env SHOAL_AGENT_API_ADDR=0.0.0.0:8443 --port 8080 --port 8443 \
  --label org.opencontainers.image.title=shoal-operator \
  --label "org.opencontainers.image.description=Shoal operator: ships, compresses and rolls out ML models to fleets of edge Kubernetes nodes"
PAUSE_VERSION := 3.10.1
PAUSE_MODULE := k8s.io/kubernetes@v1.34.4
# The kubelet's pause image: pause.c of the Kubernetes module, static with musl-gcc.
define pause-image
@mkdir -p $(IMAGE_DIR)/pause
@src="$$(go env GOMODCACHE)/$(PAUSE_MODULE)/build/pause/linux/pause.c"; \
  [[ -f $$src ]] || go mod download $(PAUSE_MODULE); \
  echo "musl-gcc -Os -static $$src -o $(IMAGE_DIR)/pause/pause"; \
  musl-gcc -Os -Wall -Werror -static -s -DVERSION=v$(PAUSE_VERSION) -o $(IMAGE_DIR)/pause/pause "$$src"
$(IMAGE_TOOL) build --source-date-epoch $(IMAGE_EPOCH) --arch amd64 --output $(IMAGE_DIR)/pause-amd64.tar \
  --reference localhost/shoal/pause:$(PAUSE_VERSION) --binary $(IMAGE_DIR)/pause/pause=/pause \
  --user 65535:65535 --entrypoint /pause
endef
IMAGE_ARCHIVES = $(foreach arch,amd64 arm64,$(IMAGE_DIR)/shoal-agent-$(arch).tar $(IMAGE_DIR)/shoal-operator-$(arch).tar) \
  $(IMAGE_DIR)/pause-amd64.tar

.PHONY: images node-images images-check docker-images
## images: target/images/shoal-{agent,operator}-{amd64,arm64}.tar and pause-amd64.tar (OCI archives, no Docker needed)
images: deps
	cargo build --locked -p shoal-oci-image --bin shoal-oci-image
	$(call musl-build,amd64)
	$(call musl-build,arm64)
	$(pause-image)
	$(call agent-image,amd64)
	$(call agent-image,arm64)
	$(call operator-image,amd64)
	$(call operator-image,arm64)
	@echo; $(IMAGE_TOOL) inspect $(IMAGE_ARCHIVES)

## node-images: only what the real node needs for make demo: the amd64 agent and pause images
node-images: deps
	cargo build --locked -p shoal-oci-image --bin shoal-oci-image
	$(call musl-build,amd64)
	$(pause-image)
	$(call agent-image,amd64)
	@echo; $(IMAGE_TOOL) inspect $(IMAGE_DIR)/shoal-agent-amd64.tar $(IMAGE_DIR)/pause-amd64.tar

## images-check: the archives' configs, static binaries, both agents serving a real model (arm64 under qemu), containerd import
images-check: images test-models
	IMAGE_DIR=$(IMAGE_DIR) IMAGE_TOOL=$(IMAGE_TOOL) IMAGE_REPO=$(IMAGE_REPO) VERSION=$(VERSION) \
	  IMAGE_REVISION=$(IMAGE_REVISION) PAUSE_VERSION=$(PAUSE_VERSION) tests/images/check.sh

# The same images built by Docker from the Dockerfiles (needs a Docker engine with BuildKit).
IMAGE_BUILDS = \
  "docker build -f Dockerfile.operator --build-arg VERSION=$(VERSION) -t $(IMAGE_REPO)/shoal-operator:$(VERSION) ." \
  "docker build -f Dockerfile.agent --build-arg VERSION=$(VERSION) -t $(IMAGE_REPO)/shoal-agent:$(VERSION) ."

## docker-images: the operator and agent images with Docker from the Dockerfiles (needs a Docker engine)
docker-images:
	@builds=($(IMAGE_BUILDS)); \
	  if ! command -v docker >/dev/null; then why="docker is not installed"; \
	  elif ! docker info >/dev/null 2>&1; then why="docker cannot reach a Docker engine (docker info failed)"; \
	  else why=; fi; \
	  if [[ -n $$why ]]; then \
	    echo "No Docker engine found: $$why. The images are built with:" >&2; \
	    printf '  DOCKER_BUILDKIT=1 %s\n' "$${builds[@]}" >&2; exit 1; fi; \
	  for build in "$${builds[@]}"; do echo "DOCKER_BUILDKIT=1 $$build"; DOCKER_BUILDKIT=1 $$build; done

# Fuzzing (fuzz/, see fuzz/README.md): cargo-fuzz with libFuzzer, on the nightly
# toolchain (or stable with RUSTC_BOOTSTRAP=1 when there is none). cargo-fuzz is
# installed from crates.io into the cache, by version, when missing.
CARGO_FUZZ_VERSION := 0.13.1
CARGO_FUZZ_ROOT := $(SHOAL_CACHE)/cargo-fuzz-$(CARGO_FUZZ_VERSION)
CARGO_FUZZ := $(CARGO_FUZZ_ROOT)/bin/cargo-fuzz
export CARGO_FUZZ
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 20
# The fuzz builds (nightly, sanitizer flags: nothing shared with CARGO_TARGET_DIR) live
# in the cache, keyed by toolchain and fuzz/Cargo.lock: the smoke run's dev build takes
# ~3 minutes cold, `make fuzz`'s release + ASan build ~20; ~1-2 minutes warm.
FUZZ_KEY := $(shell { rustc +nightly -V 2>/dev/null || rustc -V; cat fuzz/Cargo.lock; } | sha256sum | cut -c1-12)
FUZZ_TARGET_DIR ?= $(SHOAL_CACHE)/fuzz-target/$(FUZZ_KEY)
export FUZZ_TARGET_DIR

.PHONY: fuzz fuzz-smoke cargo-fuzz
cargo-fuzz: $(CARGO_FUZZ)
$(CARGO_FUZZ):
	@echo "Installing cargo-fuzz $(CARGO_FUZZ_VERSION) from crates.io into $(CARGO_FUZZ_ROOT)"
	cargo install --quiet --locked --root $(CARGO_FUZZ_ROOT) cargo-fuzz --version $(CARGO_FUZZ_VERSION)

## fuzz-smoke: every fuzz target for 20 s (CI); fails on a crash, hang or out-of-memory.
## An unoptimised build with debug assertions and no sanitizer: ~3 min cold, not ~20.
fuzz-smoke: $(CARGO_FUZZ)
	FUZZ_PROFILE=dev FUZZ_SANITIZER=none fuzz/run.sh $(FUZZ_SMOKE_SECONDS)

## fuzz: every fuzz target for 10 minutes (FUZZ_SECONDS); the corpus grows in fuzz/corpus/
fuzz: $(CARGO_FUZZ)
	fuzz/run.sh $(FUZZ_SECONDS)

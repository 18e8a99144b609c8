# dccfs: `make run` sets up and runs the demo, `make test` sets up and runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORPUS := .corpus
SHARED_CORPUS := ../shared/corpus/build_corpus.py
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# Test files run on this many workers (one per core, at most 4): most tests wait on mounts, disks and
# daemons, so two workers on two cores take about 0.65 of the serial time. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: setup system-deps mount-helper kernels corpus corpus-full run test stress bench clean

setup: $(STAMP) mount-helper kernels

system-deps:
	@if ! command -v fusermount3 >/dev/null || ! command -v pkg-config >/dev/null \
	    || ! pkg-config --exists fuse3 || ! command -v rsync >/dev/null; then \
	  echo "installing fuse3, libfuse3-dev, pkg-config and rsync (the checkpoint-copy test) with apt"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 libfuse3-dev pkg-config rsync; \
	fi

$(STAMP): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# mount(8) looks for /sbin/mount.fuse.dccfs when asked for -t fuse.dccfs or an fstab line.
# Checked on every run: another checkout on the same machine may have pointed it elsewhere.
mount-helper: $(STAMP)
	@helper="$$(pwd)/$(VENV)/bin/mount.fuse.dccfs"; \
	if [ "$$(id -u)" = 0 ] && [ "$$(readlink /sbin/mount.fuse.dccfs)" != "$$helper" ]; then \
	  ln -sf "$$helper" /sbin/mount.fuse.dccfs && echo "linked /sbin/mount.fuse.dccfs -> $$helper"; \
	fi

# numba compiles the codec kernels into its cache once (minutes), then loads them in about a second:
# done here, with a message, instead of silently under the demo's first mount or the first tests.
kernels: $(STAMP)
	@$(VENV)/bin/dccfs warm-up

corpus: setup
	$(PY) $(SHARED_CORPUS) $(CORPUS) > /dev/null

corpus-full: setup
	$(PY) $(SHARED_CORPUS) $(CORPUS) --mpnet --checkpoints > /dev/null

run: corpus
	$(PY) tools/demo.py --corpus $(CORPUS) --demo-dir demo

test: corpus
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

stress: corpus
	DCCFS_STRESS=1 DCCFS_FUZZ_SECONDS=600 $(PY) -m pytest -m stress -rA --durations=30 $(PYTEST_ARGS)

bench: corpus-full
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	$(PY) tools/bench_codecs.py $(CORPUS)/real/*.safetensors $(CORPUS)/ckpt/*step20* $(CORPUS)/other/*

clean:
	-fusermount3 -u demo/mnt 2>/dev/null
	rm -rf $(VENV) demo build *.egg-info

# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each bootstraps .venv with Python 3.12 and the pinned requirements.

PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { command -v $$p || echo $$p; } && break; done)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-isa slurm demo bench docker clean

$(STAMP): requirements.txt setup.py
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or pass PYTHON=/path/to/python3.12"; exit 1; }
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# tests/test_slurm.py starts a private Slurm cluster: install it where we can (root with apt), else those tests
# skip with one line saying why (a failure under CI=true).
slurm:
	@command -v slurmctld >/dev/null && command -v munged >/dev/null \
	|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	     && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; } \
	|| echo "make: slurm-wlm and munge not installed (needs root and apt-get): the Slurm tests will skip"; }

test: $(STAMP) slurm
	$(VENV)/bin/ruff check .
	$(VPY) -m pytest -q -n 2 --dist loadfile tests

# The tests whose tolerances rest on floating-point arithmetic (kernels, layouts, precisions, optimizers), again on
# another CPU kernel path: oneDNN and ATen limited to AVX2, as on a CPU without AVX-512. A bound that holds on one
# CPU's kernels only fails here on any machine (on an AVX2-only CPU both runs take the same path).
ISA_TESTS := $(addprefix tests/,test_model_parallel.py test_parallel_training.py test_batch_layouts.py \
	test_simreg.py test_simreg_precision.py test_simreg_distributed.py test_regularizers.py test_baselines.py \
	test_adagc.py test_adagc_megatron.py)

test-isa: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(VPY) -m pytest -q -n 2 --dist loadfile $(ISA_TESTS)

demo: $(STAMP)
	$(VPY) -m megatron_simreg.demo

bench: $(STAMP)
	$(VPY) -m megatron_simreg.bench.simreg

docker:
	docker build -f docker/Dockerfile -t megatron-simreg .

clean:
	rm -rf $(VENV) runs

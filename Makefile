# microsnoop-ray: every target installs what it needs into .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A local wheel folder (the CPU torch build lies there on the project's machines).
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
SHARED ?= ../shared/data
# The exact set the tests ran with (pyproject.toml states ranges); the CPU torch build comes through it.
# Bytecode is compiled once, on every core, after pip (which would compile one file at a time): left to
# first use, the dozen Ray worker processes a job starts at once all compile the same modules, which
# doubled the cluster test on a fresh clone (418 s against 210 s).
CONSTRAINTS := constraints.txt

.PHONY: install test demo screen cellpainting bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile $(FIND_LINKS) -c $(CONSTRAINTS) -e '.[dev,eval]'
	$(PY) -m compileall -q -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") microsnoop_ray > /dev/null \
	  || echo "(bytecode: some files did not compile; torch ships a few for newer Pythons)"
	$(PY) -c "from importlib.metadata import version as v; import torch, ray, cellpose, zarr, anndata; print('installed', *(f'{p} {v(p)}' for p in ('torch', 'ray', 'pandas', 'anndata')))"
	touch $(STAMP)

install: $(STAMP)

# Two workers, each given whole test modules: the suite waits on process and Ray start-ups more than it
# computes (one worker kept 2 cores about 60 % busy), and a module's fixtures then start once.
test: install
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests

demo: install
	$(PY) jobs/demo.py plate --out demo_output

# The BBBC021 mini-screen (needs ../shared/data/bbbc021_chx beside the repository).
screen: install
	$(PY) jobs/demo.py bbbc021 --out screen_output

# The LINCS Cell Painting fragment: load_data.csv as it comes, nuclei + cells, both feature sets, the
# JUMP recipe and copairs mAP (needs ../shared/data/lincs_cellpainting beside the repository).
cellpainting: install
	$(PY) jobs/demo.py cellpainting --out cellpainting_output

bench: install
	$(PY) benchmarks/encoder.py
	$(PY) benchmarks/pipeline.py

clean:
	rm -rf $(VENV) demo_output screen_output cellpainting_output .pytest_cache build *.egg-info

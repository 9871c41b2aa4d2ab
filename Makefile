# Fresh machine: `make demo` runs the main job, `make test` runs the whole test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.catalens-installed

.PHONY: setup demo test lint bench docs

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/torch.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/torch.txt
	$(PY) -m pip install -q -e '.[dev]'
	# OCR models of the 'text' feature: only the two ONNX files of rapidocr-onnxruntime's wheel,
	# never the wheel itself (it requires opencv-python, whose cv2 would shadow contrib's SIFT).
	$(PY) -m catalens.indexer.features.ocr
	touch $(STAMP)

demo: setup
	$(VENV)/bin/catalens demo --workdir demo-index

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m benchmarks.bench_speed

docs: setup
	$(VENV)/bin/mkdocs serve

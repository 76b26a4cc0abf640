# The README's two commands: `make demo` and `make test`. Both install what they need into .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where torch comes from. Empty = the default index (on these CPU machines pip takes the CPU wheel
# that lies on disk). Elsewhere on a CPU-only machine, set it to PyTorch's CPU index to avoid the
# multi-GB CUDA build: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
NPROC  ?= 2

.PHONY: install demo demo-zero2 demo-qlora demo-classify demo-assets test test-fast lint format clean

install: $(VENV)/.installed $(VENV)/.deepspeed_op

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first and pinned, so nothing later resolves a CUDA build. A torch already in the
	@# venv (e.g. the user's CUDA build on a GPU machine) is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# DeepSpeed's CPU communication op and CPU Adam op (optimizer offload), built once into the venv
# (TORCH_EXTENSIONS_DIR defaults to $(VENV)/torch_extensions): otherwise the first DeepSpeed run
# compiles them, for minutes. Without a C++ compiler, or if it fails, a warning: that first run
# retries and reports why (an offload run falls back to torch's AdamW, saying so).
$(VENV)/.deepspeed_op: $(VENV)/.installed
	@if command -v $${CXX:-c++} >/dev/null 2>&1; then \
	  $(BIN)/python -m trainer.engine.deepspeed_ops --build || \
	    echo "warning: DeepSpeed's CPU ops did not build; DeepSpeed runs will retry"; \
	else \
	  echo "warning: no C++ compiler ($${CXX:-c++}): DeepSpeed's CPU ops not built"; \
	fi
	touch $@

demo-assets: install
	$(BIN)/python -m launch.make_demo --output demo_assets
	$(BIN)/python -m data.prepare --input demo_assets/train.jsonl --output demo_assets/train_shards --shard-size 4000rows

demo: demo-assets
	rm -rf runs/demo  # a fresh run each time (a kept run dir would auto-resume, already finished)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m launch.train configs/demo.yaml

demo-zero2: demo-assets
	rm -rf runs/demo_zero2
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m launch.train configs/demo_zero2.yaml

# QLoRA (adapters on a frozen 4-bit base) needs a base that has skills to adapt: first the demo
# model is trained in full on the same skills asked in other words (configs/demo_qlora_base.yaml;
# a finished base is kept and not retrained on a rerun), then QLoRA adapts it to the demo task.
demo-qlora: demo-assets
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m launch.train configs/demo_qlora_base.yaml
	rm -rf runs/demo_qlora
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m launch.train configs/demo_qlora.yaml

# A text classifier (task: sequence_classification): a tiny BERT learns the sentiment of
# synthetic reviews, negation included (data/synthetic_classify.py), to >= 90% eval accuracy.
demo-classify: demo-assets
	rm -rf runs/demo_classify
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m launch.train configs/demo_classify.yaml

test: install lint
	$(BIN)/python -m pytest -q -ra --durations=25

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs demo_assets .pytest_cache .ruff_cache

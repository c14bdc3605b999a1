# deepsigns: `make demo` and `make test` each set up a fresh clone by themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo
export DEEPSIGNS_PASSPHRASE ?= demo-passphrase-not-for-real-use

.PHONY: setup demo test test-fast fuzz bench sample-models clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 is a local CPU wheel; anything newer pulls GBs of CUDA
	$(BIN)/pip install --quiet --no-compile torch==2.13.0
	$(BIN)/pip install --quiet --no-compile -e ".[test]"
	# byte-compiled on every core at once (pip compiles one file at a time: 76 s of set-up, 53 s
	# so); a file written for a newer Python does not compile, and is passed over, as pip does
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

setup: $(STAMP)

# The main job on the bundled sample model: keygen (white-box + black-box keys), embed,
# export, extract from both files, verify from outputs alone, and the unmarked model not claimed.
demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(BIN)/deepsigns inspect sample_models/digits-mlp.safetensors
	$(BIN)/deepsigns keygen --model sample_models/digits-mlp.safetensors --data digits \
	    --scheme hidden,output --message "ACME Corp 2026" --out $(DEMO)/owner.dskey
	$(BIN)/deepsigns embed --model sample_models/digits-mlp.safetensors --data digits \
	    --keys $(DEMO)/owner.dskey --out $(DEMO)/marked.safetensors
	$(BIN)/deepsigns export $(DEMO)/marked.safetensors --out $(DEMO)/marked.onnx
	$(BIN)/deepsigns extract --model $(DEMO)/marked.onnx --keys $(DEMO)/owner.dskey
	$(BIN)/deepsigns extract --model $(DEMO)/marked.safetensors --keys $(DEMO)/owner.dskey
	$(BIN)/deepsigns verify --model $(DEMO)/marked.onnx --keys $(DEMO)/owner.dskey
	$(BIN)/deepsigns export sample_models/digits-mlp.safetensors --out $(DEMO)/unmarked.onnx
	@echo "-- the unmarked sample model must not be claimed (exit 1):"
	$(BIN)/deepsigns verify --model $(DEMO)/unmarked.onnx --keys $(DEMO)/owner.dskey; test $$? -eq 1
	$(BIN)/deepsigns inspect $(DEMO)/owner.dskey
	@echo "-- a thief shuffles and rescales the hidden units (the same function), then fine-tunes:"
	$(BIN)/deepsigns attack permute --model $(DEMO)/marked.safetensors --data digits --out $(DEMO)/shuffled.safetensors
	$(BIN)/deepsigns attack finetune --model $(DEMO)/shuffled.safetensors --data digits --epochs 30 \
	    --out $(DEMO)/stolen.safetensors
	@echo "-- the owner's keys still claim it (exit 0):"
	$(BIN)/deepsigns extract --model $(DEMO)/stolen.safetensors --keys $(DEMO)/owner.dskey
	@echo "demo: all files are in $(DEMO)/"

# two test processes (pytest-xdist), one per core; a file's tests stay in one process, and the
# files go out in the order tests/conftest.py collects them (the longest first)
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

# A long fuzz campaign: mutated inputs through every command (tests/fuzzing.py has the oracle).
# A fresh seed each run (printed); FUZZ_SEED=N repeats one campaign, FUZZ_CASES=N sizes it.
FUZZ_CASES ?= 5000
fuzz: setup
	$(BIN)/python scripts/fuzz.py --cases $(FUZZ_CASES) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

# What embedding costs: overhead over plain fine-tuning, 1 -> 2 process scaling, peak memory
# against the data set's size (scripts/bench.py), then the per-scheme cost figures.
bench: setup
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/blackbox_figures.py cost
	$(BIN)/python scripts/gradsigns_figures.py cost

# Regenerate the bundled sample models (reproducible: fixed seeds, CPU).
sample-models: setup
	$(BIN)/deepsigns train --arch mlp --data digits --epochs 30 --seed 0 --device cpu \
	    --out sample_models/digits-mlp.safetensors --force
	$(BIN)/deepsigns train --arch cnn --data digits --epochs 30 --seed 0 --device cpu \
	    --out sample_models/digits-cnn.safetensors --force

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache *.egg-info

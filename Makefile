# Quick start: `make train`, then `make test`. CONFIG, ARGS ("key=value ...") and RUN pass through.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
ARGS ?=
RUN ?=
RUNS ?=

.PHONY: train submit compare test test-fast bench photos-bench finetune-study scaling-study quality-study photos-study pseudo-study ablation-study clean

# reinstalls whenever pyproject.toml (the dependencies) changes
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

train: $(VENV)/.installed
	$(BIN)/labelcomp train --config $(CONFIG) $(if $(RUN),--resume $(RUN)) $(ARGS)

submit: $(VENV)/.installed
	$(BIN)/labelcomp submit --config $(CONFIG) $(if $(RUN),--run $(RUN)) $(if $(RUNS),--runs $(RUNS)) $(ARGS)

compare: $(VENV)/.installed
	$(BIN)/labelcomp compare --config $(CONFIG) $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# the edit loop: everything but the tests marked slow, still training a tiny real model end to end
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

# benchmark, not a test: model-only vs pipeline vs loading vs inference speed, side by side
bench: $(VENV)/.installed
	$(BIN)/labelcomp bench --config $(CONFIG) $(ARGS)

# benchmark, not a test: make bench on the shared clothing photos at 224 px (needs ../shared; skips without it)
PHOTOS_COMPETITION := runs/clothing-photos
photos-bench: $(VENV)/.installed
	$(BIN)/python tools/photos_study.py --competition $(PHOTOS_COMPETITION)
	test ! -f $(PHOTOS_COMPETITION)/competition.yaml || $(BIN)/labelcomp bench --config configs/photos.yaml \
		competition=$(PHOTOS_COMPETITION) augment.image_size=224 $(ARGS)

# benchmark, not a test: needs ../shared (skips without it); STUDY="--per-class 500 --folds 5" for all images
finetune-study: $(VENV)/.installed
	$(BIN)/python tools/finetune_study.py $(STUDY)

# benchmark, not a test: seconds per epoch at 1k/5k/10k images and 32/64/128 px (needs ../shared)
scaling-study: $(VENV)/.installed
	$(BIN)/python tools/scaling_study.py

# benchmark, not a test: configs/quick.yaml and quality.yaml on 10,000 real images (needs ../shared; ~50 min)
# STUDY="--recipes quick --per-class 280,320,360,400": what more training images are worth (~30 min)
quality-study: $(VENV)/.installed
	$(BIN)/python tools/quality_study.py $(STUDY)

# benchmark, not a test: pseudo-label rounds from configs/quick.yaml on CIFAR with 2,000 held-out test images
# (needs ../shared; ~15 min); STUDY="--variant 'NAME: key=value ...'" for each round to try
pseudo-study: $(VENV)/.installed
	$(BIN)/python tools/pseudo_study.py $(STUDY)

# benchmark, not a test: configs/photos.yaml on the 3,068 shared clothing photos, 5 folds (needs ../shared; ~30 min)
photos-study: $(VENV)/.installed
	$(BIN)/python tools/photos_study.py $(STUDY)

# benchmark, not a test: configs/quick.yaml against each configs/ablations/ file, 5,000 images, 3 folds (~25 min)
empty :=
comma := ,
ABLATIONS := $(subst $(empty) $(empty),$(comma),$(wildcard configs/ablations/*.yaml))
ablation-study: $(VENV)/.installed
	$(BIN)/python tools/quality_study.py --recipes quick,$(ABLATIONS) --per-class 250 --holdout-per-class 0 --set cv.folds=3

clean:
	rm -rf runs lightning_logs .pytest_cache

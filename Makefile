# crossflow: `make help` lists the targets. Every target installs what it needs into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The torch build to install (this machine has these wheels on disk; elsewhere any torch>=2.4 works).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
CROSSFLOW := $(BIN)/crossflow

DEMO_DIR ?= data/demo
DEMO_RUN ?= runs/pretrain/demo
BACKBONE ?= $(DEMO_RUN)/backbone.pt
DEMO ?=
ARGS ?=

.PHONY: help setup pretrain test test-fast benchmark demo-data eval-voc-cls eval-voc-det eval-voc-seg eval-linear clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  make eval-voc-cls   VOC07 classification mAP (fine-tuning)"
	@echo "  make eval-voc-det   VOC07 Fast R-CNN detection mAP"
	@echo "  make eval-voc-seg   VOC12 hypercolumn segmentation mean IU"
	@echo "  make eval-linear    ImageNet linear probes on conv1..conv5"
	@echo "  variables: BACKBONE=<backbone file|random> DATA=<dataset folder> DEMO=1 ARGS='--trainer.max_steps 10'"

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed ## install crossflow and its dependencies into .venv (nothing else)

$(DEMO_DIR)/videos/synth.json: | $(VENV)/.installed
	$(CROSSFLOW) synth videos --out $(DEMO_DIR)/videos --num-videos 256 --seed 0

$(DEMO_DIR)/pairs/index.json: $(DEMO_DIR)/videos/synth.json
	$(CROSSFLOW) prepare $(DEMO_DIR)/videos --out $(DEMO_DIR)/pairs --short-side 144 --frames-per-video 8 --gap 5 --val-fraction 0.1 --workers 2 --seed 0

demo-data: $(DEMO_DIR)/pairs/index.json ## synthetic demo videos -> shards (the real prepare pipeline)

pretrain: $(DEMO_DIR)/pairs/index.json ## the whole pipeline on the synthetic world: synth, prepare, train, export, summary
	$(CROSSFLOW) fit --config configs/pretrain/demo.yaml $(ARGS)
	$(CROSSFLOW) export $(DEMO_RUN)/checkpoints/best.ckpt $(DEMO_RUN)/backbone.pt
	$(CROSSFLOW) summary $(DEMO_RUN)

test: $(VENV)/.installed ## the test suite (CPU, a few minutes)
	$(BIN)/pytest -q

test-fast: $(VENV)/.installed ## the test suite without the end-to-end runs
	$(BIN)/pytest -q -m "not slow"

benchmark: $(VENV)/.installed ## throughput benchmarks; figures go to benchmarks/results/
	$(BIN)/python benchmarks/pretrain_throughput.py

# eval-<name>: fit then test one transfer benchmark on BACKBONE (a backbone file or `random`).
# DEMO=1 uses configs/eval/demo_<name>.yaml on the synthetic world (generated if absent).
define eval_target
$(1): $(VENV)/.installed $(if $(DEMO),$(DEMO_DIR)/$(3)/synth.json)
	$(CROSSFLOW) fit --config configs/eval/$(if $(DEMO),demo_)$(2).yaml --model.init_args.backbone $(BACKBONE) $(if $(DATA),--data.init_args.root $(DATA)) $(ARGS)
	$(CROSSFLOW) test --config configs/eval/$(if $(DEMO),demo_)$(2).yaml --model.init_args.backbone $(BACKBONE) $(if $(DATA),--data.init_args.root $(DATA)) --ckpt_path last $(ARGS)
endef
$(eval $(call eval_target,eval-voc-cls,voc07_cls,voc))
$(eval $(call eval_target,eval-voc-det,voc07_det,voc))
$(eval $(call eval_target,eval-voc-seg,voc12_seg,voc))
$(eval $(call eval_target,eval-linear,in1k_linear,imagenet))

$(DEMO_DIR)/voc/synth.json: | $(VENV)/.installed
	$(CROSSFLOW) synth voc --out $(DEMO_DIR)/voc --num-images 300 --seed 1

$(DEMO_DIR)/imagenet/synth.json: | $(VENV)/.installed
	$(CROSSFLOW) synth imagenet --out $(DEMO_DIR)/imagenet --seed 2

clean: ## remove generated demo data and runs (keeps .venv)
	rm -rf $(DEMO_DIR) runs wandb

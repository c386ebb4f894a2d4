# crossflow: `make help` lists the targets. Every target installs what it needs into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The torch build to install (this machine has these wheels on disk; elsewhere any torch>=2.4 works).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
# glibc serves every block over 32 MB (AlexNet's fc6 weight and its gradient are 151 MB) with a fresh mmap and
# unmaps it on free, so each CPU training step page-faults its big tensors back in: a third of the suite's time was
# system time. MALLOC_MMAP_MAX_=0 keeps them in the heap and a 4 GB trim threshold keeps the heap (fc layers alone:
# sys time 1.05 s -> 0 s, 535k page faults -> 0 per 10 steps; tests/test_learning.py 89.7 s -> 68.4 s; 30 steps of
# the demo detection: 14.4-15.8 s -> 5.2-5.4 s of system time, wall 45-48 s -> 35-36 s). Every target runs with it.
CPU_MALLOC = MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296
CROSSFLOW := $(CPU_MALLOC) $(BIN)/crossflow

DEMO_DIR ?= data/demo
DEMO_RUN ?= runs/pretrain/demo
BACKBONE ?= $(DEMO_RUN)/backbone.pt
DEMO ?=
ARGS ?=
# Eval runs go to runs/eval/$(RUN_NAME)/<benchmark>, so results of several backbones sit side by side.
# (an absolute path loses its leading /: a name starting with - would be read as an option)
RUN_NAME ?= $(subst /,-,$(patsubst /%,%,$(basename $(BACKBONE))))
REPRO ?= runs/reproduce
REPRO_ROWS ?= supervised random random-rescaled flow_classification cross_pixel
REPRO_BENCHMARKS ?= voc07_cls voc07_det voc12_seg in1k_linear
REPRO_SEEDS ?= 0
# pretraining seeds of the rows crossflow pretrains from flow (each seed: its own pretraining, export and evals)
REPRO_PRETRAIN_SEEDS ?= 0 1 2
REPRO_PRETRAIN_ARGS ?=
REPRO_EVAL_ARGS ?=
# torch threads of each pretraining and eval job: run `make -jN reproduce-demo` with N your cores, one thread a job
REPRO_THREADS ?= 1
REPRO_CROSSFLOW = OMP_NUM_THREADS=$(REPRO_THREADS) $(CROSSFLOW)
DEMO_VIDEOS ?= 256
DEMO_IMAGES ?= 300
DEMO_IMAGES_PER_CLASS ?= 100
# the supervised reference's labelled set (rendered with its own seed: never the evals' images)
SUPERVISED_IMAGES_PER_CLASS ?= $(DEMO_IMAGES_PER_CLASS)
SUPERVISED_RUN ?= runs/pretrain/supervised

.PHONY: help setup pretrain pretrain-supervised test test-fast benchmark demo-data eval-voc-cls eval-voc-det eval-voc-seg eval-linear tables reproduce-demo clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  make eval-voc-cls   VOC07 classification mAP (fine-tuning)"
	@echo "  make eval-voc-det   VOC07 Fast R-CNN detection mAP"
	@echo "  make eval-voc-seg   VOC12 hypercolumn segmentation mean IU"
	@echo "  make eval-linear    ImageNet linear probes on conv1..conv5"
	@echo "  variables: BACKBONE=<backbone file|torchvision AlexNet .pth|random|random-rescaled> DATA=<dataset folder> DEMO=1 ARGS='--trainer.max_steps 10'"

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed ## install crossflow and its dependencies into .venv (nothing else)

$(DEMO_DIR)/videos/synth.json: | $(VENV)/.installed
	$(CROSSFLOW) synth videos --out $(DEMO_DIR)/videos --num-videos $(DEMO_VIDEOS) --seed 0

$(DEMO_DIR)/pairs/index.json: $(DEMO_DIR)/videos/synth.json
	$(CROSSFLOW) prepare $(DEMO_DIR)/videos --out $(DEMO_DIR)/pairs --short-side 144 --frames-per-video 8 --gap 5 --val-fraction 0.1 --workers 2 --seed 0

demo-data: $(DEMO_DIR)/pairs/index.json ## synthetic demo videos -> shards (the real prepare pipeline)

pretrain: $(DEMO_DIR)/pairs/index.json ## the whole pipeline on the synthetic world: synth, prepare, train, export, summary
	$(CROSSFLOW) fit --config configs/pretrain/demo.yaml --data.init_args.data_dir $(DEMO_DIR)/pairs $(ARGS)
	$(CROSSFLOW) export $(DEMO_RUN)/checkpoints/best.ckpt $(DEMO_RUN)/backbone.pt
	$(CROSSFLOW) summary $(DEMO_RUN)

pretrain-supervised: $(DEMO_DIR)/imagenet_supervised/synth.json ## the supervised reference: AlexNet trained with the synthetic labels, exported
	$(CROSSFLOW) fit --config configs/pretrain/supervised_demo.yaml --data.init_args.root $(DEMO_DIR)/imagenet_supervised --trainer.default_root_dir $(SUPERVISED_RUN) $(ARGS)
	$(CROSSFLOW) export $(SUPERVISED_RUN)/checkpoints/best.ckpt $(SUPERVISED_RUN)/backbone.pt

# TEST_WORKERS processes of one thread each, a test file to each: 3 on the 2-core CPU, since the end-to-end tests
# wait on process start-ups and checkpoint writes (fresh clone: 12 min 5 s and 13 min 36 s with 3, 12 min 57 s and
# 13 min 15 s with 2: no clear gain)
TEST_WORKERS ?= 3
PYTEST = $(CPU_MALLOC) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(VENV)/.installed ## the test suite (CPU, about 15 minutes)
	$(PYTEST)

test-fast: $(VENV)/.installed ## the test suite without the end-to-end runs
	$(PYTEST) -m "not slow"

benchmark: $(VENV)/.installed ## throughput benchmarks; figures go to benchmarks/results/
	$(CPU_MALLOC) $(BIN)/python benchmarks/pretrain_throughput.py

# eval-<name>: fit then test one transfer benchmark on BACKBONE (a backbone file or `random`).
# DEMO=1 uses configs/eval/demo_<name>.yaml on the synthetic world (generated if absent).
define eval_target
$(1): $(VENV)/.installed $(if $(DEMO),$(DEMO_DIR)/$(3)/synth.json)
	$(CROSSFLOW) fit --config configs/eval/$(if $(DEMO),demo_)$(2).yaml --model.init_args.backbone $(BACKBONE) $(if $(DATA),--data.init_args.root $(DATA),$(if $(DEMO),--data.init_args.root $(DEMO_DIR)/$(3))) --trainer.default_root_dir runs/eval/$(RUN_NAME)/$(if $(DEMO),demo_)$(2) --trainer.logger.init_args.name $(RUN_NAME)-$(if $(DEMO),demo_)$(2) $(ARGS)
	$(CROSSFLOW) test --config configs/eval/$(if $(DEMO),demo_)$(2).yaml --model.init_args.backbone $(BACKBONE) $(if $(DATA),--data.init_args.root $(DATA),$(if $(DEMO),--data.init_args.root $(DEMO_DIR)/$(3))) --trainer.default_root_dir runs/eval/$(RUN_NAME)/$(if $(DEMO),demo_)$(2) --trainer.logger.init_args.name $(RUN_NAME)-$(if $(DEMO),demo_)$(2) --ckpt_path last $(ARGS)
endef
$(eval $(call eval_target,eval-voc-cls,voc07_cls,voc))
$(eval $(call eval_target,eval-voc-det,voc07_det,voc))
$(eval $(call eval_target,eval-voc-seg,voc12_seg,voc))
$(eval $(call eval_target,eval-linear,in1k_linear,imagenet))

tables: $(VENV)/.installed ## Tables 1 and 2 (markdown) from every results.json under runs/eval
	$(CROSSFLOW) report runs/eval --out runs/eval/tables.md

# reproduce-demo: pretrain the cross-pixel model and the direct baseline on the synthetic world with
# the same budget, once per pretraining seed, evaluate them and the random and supervised backbones on the four
# demo benchmarks, write the tables (mean +- std over the runs of a row).
# A run is a row (random, random-rescaled, supervised) or <objective>/pretrain_seed<P>; each eval lands in
# $(REPRO)/<run>/<benchmark>/seed<S>/results.json, and an interrupted run resumes.
repro_fixed = $(filter random random-rescaled supervised,$(REPRO_ROWS))
repro_runs = $(repro_fixed) $(foreach seed,$(REPRO_PRETRAIN_SEEDS),$(foreach row,$(filter-out $(repro_fixed),$(REPRO_ROWS)),$(row)/pretrain_seed$(seed)))
repro_backbone = $(if $(filter random random-rescaled,$(1)),$(1),$(REPRO)/pretrain/$(1)/backbone.pt)
repro_data = $(DEMO_DIR)/$(if $(filter in1k_linear,$(1)),imagenet,voc)
repro_results = $(foreach run,$(repro_runs),$(foreach bench,$(REPRO_BENCHMARKS),$(foreach seed,$(REPRO_SEEDS),$(REPRO)/$(run)/$(bench)/seed$(seed)/results.json)))

# The supervised row: the same AlexNet trained with the labels of $(DEMO_DIR)/imagenet_supervised (this explicit
# rule takes precedence over the pattern rule below).
$(REPRO)/pretrain/supervised/backbone.pt: $(DEMO_DIR)/imagenet_supervised/synth.json
	$(REPRO_CROSSFLOW) fit --config configs/pretrain/supervised_demo.yaml --data.init_args.root $(DEMO_DIR)/imagenet_supervised --trainer.default_root_dir $(REPRO)/pretrain/supervised --trainer.logger.init_args.name reproduce-supervised $(REPRO_PRETRAIN_ARGS)
	$(REPRO_CROSSFLOW) export $(REPRO)/pretrain/supervised/checkpoints/best.ckpt $@

# $* = <objective>/pretrain_seed<P>
$(REPRO)/pretrain/%/backbone.pt: $(DEMO_DIR)/pairs/index.json
	$(REPRO_CROSSFLOW) fit --config configs/pretrain/demo.yaml --data.init_args.data_dir $(DEMO_DIR)/pairs --model.init_args.objective $(firstword $(subst /, ,$*)) --seed_everything $(patsubst pretrain_seed%,%,$(notdir $*)) --trainer.default_root_dir $(REPRO)/pretrain/$* --trainer.logger.init_args.name reproduce-$(subst /,-,$*) $(REPRO_PRETRAIN_ARGS)
	$(REPRO_CROSSFLOW) export $(REPRO)/pretrain/$*/checkpoints/best.ckpt $@

define repro_eval
$(REPRO)/$(1)/$(2)/seed$(3)/results.json: $(filter %.pt,$(call repro_backbone,$(1))) $(call repro_data,$(2))/synth.json
	$(REPRO_CROSSFLOW) fit --config configs/eval/demo_$(2).yaml --model.init_args.backbone $(call repro_backbone,$(1)) --data.init_args.root $(call repro_data,$(2)) --seed_everything $(3) --trainer.default_root_dir $(REPRO)/$(1)/$(2)/seed$(3) --trainer.logger.init_args.name reproduce-$(subst /,-,$(1))-$(2)-seed$(3) $(REPRO_EVAL_ARGS)
	$(REPRO_CROSSFLOW) test --config configs/eval/demo_$(2).yaml --model.init_args.backbone $(call repro_backbone,$(1)) --data.init_args.root $(call repro_data,$(2)) --seed_everything $(3) --trainer.default_root_dir $(REPRO)/$(1)/$(2)/seed$(3) --trainer.logger.init_args.name reproduce-$(subst /,-,$(1))-$(2)-seed$(3) --ckpt_path last $(REPRO_EVAL_ARGS)
endef
$(foreach run,$(repro_runs),$(foreach bench,$(REPRO_BENCHMARKS),$(foreach seed,$(REPRO_SEEDS),$(eval $(call repro_eval,$(run),$(bench),$(seed))))))

reproduce-demo: $(repro_results) ## the paper's comparison on the synthetic world (see the README for its wall time)
	$(CROSSFLOW) report $(REPRO) --out $(REPRO)/tables.md

$(DEMO_DIR)/voc/synth.json: | $(VENV)/.installed
	$(CROSSFLOW) synth voc --out $(DEMO_DIR)/voc --num-images $(DEMO_IMAGES) --seed 1

$(DEMO_DIR)/imagenet_supervised/synth.json: | $(VENV)/.installed
	$(CROSSFLOW) synth imagenet --out $(DEMO_DIR)/imagenet_supervised --images-per-class $(SUPERVISED_IMAGES_PER_CLASS) --seed 3

$(DEMO_DIR)/imagenet/synth.json: | $(VENV)/.installed
	$(CROSSFLOW) synth imagenet --out $(DEMO_DIR)/imagenet --images-per-class $(DEMO_IMAGES_PER_CLASS) --seed 2

clean: ## remove generated demo data and runs (keeps .venv)
	rm -rf $(DEMO_DIR) runs wandb

# One entry point for people and CI. `make test` and `make demo` build .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch (a 0.9 GB wheel); on a CUDA machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: install test test-fast demo hands lint bench gpu-check teacher-env peer-env clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dali,dev,onnx,video]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

demo: $(STAMP)
	$(PY) tools/demo.py --out $(DEMO)

# Real photos in, scored models out (tools/hands.py; README "Real hand photos, one command"):
#   make hands DATA=ROOT [EXTRA="DIR[:cutout,one] ..."] [VAL="DIR[:one] ..."] [HANDS=hands]
#              [TUTORIAL=model_final] [MONITOR=NAME-box/val_error_px] [EXTRA_SHARE=0.25] [RANKS=N]
# (ROOT: any YOLO-pose root or dataset yaml; EXTRA/VAL: photo folders the MediaPipe teacher labels,
# in $(TEACHER_VENV), made by `make teacher-env` when missing)
HANDS ?= hands
hands: $(STAMP)
	@test -n "$(DATA)" || { echo 'usage: make hands DATA=ROOT [EXTRA="DIR ..."] [VAL="DIR ..."] [HANDS=out-folder]'; exit 1; }
	$(PY) tools/hands.py --data "$(DATA)" --out "$(HANDS)" --teacher-venv "$(TEACHER_VENV)" \
		$(if $(EXTRA),--extra $(EXTRA)) $(if $(VAL),--val $(VAL)) \
		$(if $(TUTORIAL),--tutorial "$(TUTORIAL)") $(if $(MONITOR),--monitor "$(MONITOR)") \
		$(if $(EXTRA_SHARE),--extra-share "$(EXTRA_SHARE)") $(if $(RANKS),--ranks "$(RANKS)")

lint: $(STAMP)
	$(VENV)/bin/ruff check handpose tools tests
	$(VENV)/bin/ruff format --check handpose tools tests
	$(VENV)/bin/mypy handpose

bench: $(STAMP)
	$(PY) tools/bench_all.py --out bench-out

# The GPU paths (docs/gpu.md): CUDA tests + loader/train/predict benchmarks, one JSON summary,
# under 8 minutes. Needs the CUDA build of torch, so on a fresh clone of a CUDA machine:
#   make gpu-check TORCH_SPEC=torch
# (the DALI wheel, nvidia-dali-cuda130, needs an NVIDIA driver for CUDA 13). Without CUDA it
# says so in one line and exits 0.
gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py --out gpu-check-out

# A tool's own environment ($(1)) with its pinned packages ($(2)), for tools whose
# dependencies must never become handpose's; its stamp is $(1)/.installed.
define own_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(2)
	touch $(1)/.installed
endef

# The MediaPipe teacher (tools/teacher_label.py, docs/teacher.md): mediapipe 0.10.21 is the last
# wheel with its models inside and needs numpy<2. Run the tool with .venv-teacher/bin/python.
TEACHER_VENV ?= .venv-teacher
TEACHER_STAMP := $(TEACHER_VENV)/.installed
teacher-env: $(TEACHER_STAMP)

$(TEACHER_STAMP): Makefile
	$(call own_venv,$(TEACHER_VENV),"mediapipe==0.10.21" "numpy<2" "pillow>=10")

# The Ultralytics YOLO-pose peer (tools/peer_train.py, peer_predict.py, peer_score.py;
# BENCHMARKS.md, "The peer at equal CPU time"): Ultralytics is AGPL and brings its own torch
# (and torchvision to match).
PEER_VENV ?= .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed
peer-env: $(PEER_STAMP)

$(PEER_STAMP): Makefile
	$(call own_venv,$(PEER_VENV),"ultralytics==8.4.190" "torch==2.14.1" "torchvision==0.29.1")

clean:
	rm -rf $(VENV) $(TEACHER_VENV) $(PEER_VENV) $(DEMO) bench-out gpu-check-out .pytest_cache .mypy_cache .ruff_cache

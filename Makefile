# The two commands of the quick start: `make demo` and `make test`.
PYTHON ?= python3
DEMO := data/demo
DEMO_CKPT := runs/demo
DEMO_PRED := predictions/demo
# The exact versions tested (docs/demo.md). `make demo CONSTRAINTS=` installs from the ranges of
# requirements.txt instead (the figures may then differ in the last digits).
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),--constraints $(CONSTRAINTS))
PIP_PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install install-test demo test test-fast clean-demo

# Installs the requirements only when one of them (or, with CONSTRAINTS, anything they depend on) is
# missing or at another version; the check says what it installs, and pip shows its progress.
install:
	@$(PYTHON) tools/check_requirements.py $(PIN) requirements.txt || $(PYTHON) -m pip install --progress-bar on $(PIP_PIN) -r requirements.txt

TEST_REQUIREMENTS := requirements-test.txt requirements-export.txt requirements-serve.txt
install-test: install
	@$(PYTHON) tools/check_requirements.py $(PIN) $(TEST_REQUIREMENTS) || $(PYTHON) -m pip install --progress-bar on $(PIP_PIN) $(addprefix -r ,$(TEST_REQUIREMENTS))

# The demo's figures are the same bits on every machine only if the arithmetic is: the same versions
# (CONSTRAINTS), the CPU (a GPU sums in another order), two threads, and on x86-64 the AVX2 kernels of
# ATen, oneDNN and MKL (an AVX-512 machine would otherwise pick others). docs/demo.md says more.
DEMO_ENV := OMP_NUM_THREADS=2
ifneq ($(shell grep -m1 -ow avx2 /proc/cpuinfo 2>/dev/null),)
DEMO_ENV += ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2
endif

demo: install
	$(PYTHON) -m tools.make_demo_data --out $(DEMO) --num_images 600
	$(DEMO_ENV) $(PYTHON) main.py --train --img_path $(DEMO)/images --train_csv_file $(DEMO)/train_labels.csv \
		--val_csv_file $(DEMO)/val_labels.csv --ckpt_path $(DEMO_CKPT) --snapshot_dir snapshots/demo \
		--base_model tiny_cnn --pretrained none --conv_base_lr 0.01 --dense_lr 0.01 --decay --lr_decay_freq 10 \
		--epochs 30 --train_batch_size 32 --num_workers 2 --seed 0 --device cpu --quiet
	$(DEMO_ENV) $(PYTHON) test.py --model $(DEMO_CKPT)/best.pth --test_csv_file $(DEMO)/test_labels.csv --test_images $(DEMO)/images \
		--predictions $(DEMO_PRED) --num_workers 2 --contact_sheet 4 --device cpu --quiet
	@echo "demo: checkpoints in $(DEMO_CKPT), predictions and metrics.json in $(DEMO_PRED), pictures in snapshots/demo"

# Whole files in TEST_PROCESSES processes (pytest-xdist): each file's fixtures stay in one
# process, and the tests' own processes and servers use free ports and temporary folders.
# OMP_WAIT_POLICY=PASSIVE: with two test processes and the processes they start sharing the
# cores, OpenMP threads that spin while they wait took a quarter of the suite's CPU time.
TEST_PROCESSES ?= 2
test: install-test
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile tests

# The inner loop: everything but the slow, subprocess and browser tests (pytest.ini).
test-fast: install-test
	$(PYTHON) -m pytest -q tests -m "not slow and not subprocess and not browser"

clean-demo:
	rm -rf $(DEMO) $(DEMO_CKPT) $(DEMO_PRED)

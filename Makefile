# The two commands of the quick start: `make demo` and `make test`.
PYTHON ?= python3
DEMO := data/demo
DEMO_CKPT := runs/demo
DEMO_PRED := predictions/demo

.PHONY: install install-test demo test test-fast clean-demo

# Installs the pinned requirements only when one of them is missing or at another
# version; the check says what it installs, and pip shows its progress.
install:
	@$(PYTHON) tools/check_requirements.py requirements.txt || $(PYTHON) -m pip install --progress-bar on -r requirements.txt

TEST_REQUIREMENTS := requirements-test.txt requirements-export.txt requirements-serve.txt
install-test: install
	@$(PYTHON) tools/check_requirements.py $(TEST_REQUIREMENTS) || $(PYTHON) -m pip install --progress-bar on $(addprefix -r ,$(TEST_REQUIREMENTS))

demo: install
	$(PYTHON) -m tools.make_demo_data --out $(DEMO) --num_images 600
	$(PYTHON) main.py --train --img_path $(DEMO)/images --train_csv_file $(DEMO)/train_labels.csv \
		--val_csv_file $(DEMO)/val_labels.csv --ckpt_path $(DEMO_CKPT) --snapshot_dir snapshots/demo \
		--base_model tiny_cnn --pretrained none --conv_base_lr 0.01 --dense_lr 0.01 --decay --lr_decay_freq 10 \
		--epochs 30 --train_batch_size 32 --num_workers 2 --seed 0 --quiet
	$(PYTHON) test.py --model $(DEMO_CKPT)/best.pth --test_csv_file $(DEMO)/test_labels.csv --test_images $(DEMO)/images \
		--predictions $(DEMO_PRED) --num_workers 2 --contact_sheet 4 --quiet
	@echo "demo: checkpoints in $(DEMO_CKPT), predictions and metrics.json in $(DEMO_PRED), pictures in snapshots/demo"

test: install-test
	$(PYTHON) -m pytest -q tests

# The inner loop: everything but the slow, subprocess and browser tests (pytest.ini).
test-fast: install-test
	$(PYTHON) -m pytest -q tests -m "not slow and not subprocess and not browser"

clean-demo:
	rm -rf $(DEMO) $(DEMO_CKPT) $(DEMO_PRED)

# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.14.1 / torchvision 0.29.1 resolve from this machine's local wheels (see README)
	$(PY) -m pip install -q -e '.[test,dask]'
	# byte-compiled once, as pip does for a regular install (an editable one does not; where
	# PYTHONDONTWRITEBYTECODE is set, every command would compile the sources: ~50 ms a start)
	$(PY) -m compileall -q softprep softtrain
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default: a synthetic Cityscapes in the official layout.
demo: install
	$(BIN)/softprep sample cityscapes demo/cityscapes --train 12 --val 4
	$(BIN)/softprep build cityscapes --root demo/cityscapes --scales 1/8 1/4 1/2 \
		--stats-for bilinear-noaa --out demo/cityscapes.zarr --jobs 2
	$(BIN)/softprep info demo/cityscapes.zarr
	$(BIN)/softprep verify demo/cityscapes.zarr
	$(BIN)/softprep priors --store demo/cityscapes.zarr --compare nn nn-floor bilinear-noaa \
		--split all --plot demo/priors.png --csv demo/priors.csv
	$(BIN)/softprep show demo/cityscapes.zarr --index 12 --level 1/4 --out demo/show.png
	$(BIN)/softprep fidelity --store demo/cityscapes.zarr --split val --decode all --fit-split val \
		--plot demo/fidelity.png
	$(BIN)/softtrain fit --store demo/cityscapes.zarr --model deeplabv3plus_r18 --crop 32x64 \
		--levels 1/8 1/4 --batch-size 4 --iters 60 --eval-every 30 --out demo/run --overwrite

# Two pytest workers (pytest-xdist): on 2 cores the suite took 6 min 20 s against 9 min 1 s
# on one, which left a core idle (1.15 cores busy on average); pytest -n 0 runs it on one.
test: install
	$(PY) -m pytest -q -n 2; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The fast tier while editing: no process-spawning or seconds-long training tests (~1.5 min).
test-fast: install
	$(PY) -m pytest -q -n 2 -m "not slow"

.PHONY: install demo test test-fast

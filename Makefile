# Two commands do everything on a fresh machine (Debian/Ubuntu, Colab, CI):
#   make course   install, then execute every notebook on the embedded model (outputs saved in place)
#   make test     install, then run the test suite (unit tests + every notebook through nbval)
PYTHON ?= python3
SHELL := /bin/bash

.PHONY: setup test course font

font:
	@fc-list 2>/dev/null | grep -qi "Noto Color Emoji" || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq fonts-noto-color-emoji fontconfig; }

setup: font
	@# an already installed torch (CUDA or CPU) is kept; otherwise the tested release
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[test,notebooks]"

test: setup
	$(PYTHON) -m pytest

course: setup
	$(PYTHON) -m mcteach course

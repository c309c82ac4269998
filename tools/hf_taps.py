#!/usr/bin/env python
"""Moved into the package: `refjax hf-taps` (ref/tooling/hf_taps.py). This shim keeps
`python tools/hf_taps.py CHECKPOINT_DIR --inputs IN --out OUT [--dtype D]` working."""

import sys

from refjax.tooling.cli import main

if __name__ == "__main__":
    sys.exit(main(["hf-taps", *sys.argv[1:]]))

"""Run ``percontrast.cli.main`` once per argv list in a JSON file, in this one process.

Launched by torchrun / accelerate launch in test_distributed.py, so that several
distributed configurations share one process start-up (imports dominate on 2 CPU cores).
Exits with the first non-zero code.
"""
import json
import sys

from percontrast.cli import main

if __name__ == "__main__":
    for argv in json.load(open(sys.argv[1])):
        rc = main(argv)
        if rc:
            sys.exit(rc)

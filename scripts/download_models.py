#!/usr/bin/env python3
"""Pre-fetch the configured models: a thin wrapper over `mlxpool download` (same flags: NAME ... | --all, --dry-run,
--config FILE)."""

import sys

from mlxpool.cli import main

if __name__ == "__main__":
    sys.exit(main(["download", *(sys.argv[1:] or ["--all"])]))

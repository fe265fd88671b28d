"""Moved to `gift_kernels.dev.compile_check`; ``python -m gift_kernels.compile_check ...`` still runs it."""
import sys

from gift_kernels.dev.compile_check import main

if __name__ == "__main__":
    sys.exit(main())

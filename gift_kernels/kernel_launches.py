"""Moved to `gift_kernels.dev.kernel_launches`; ``python -m gift_kernels.kernel_launches README.md`` still runs it."""
import sys

from gift_kernels.dev.kernel_launches import main

if __name__ == "__main__":
    sys.exit(main())

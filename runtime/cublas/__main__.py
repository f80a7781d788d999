"""`python -m kiln.runtime.cublas [--force]`: build Kiln's cuBLAS extern into the cache now and
print its path (to copy the cache to a machine that has no headers or compiler to build it)."""

import sys

from kiln.runtime.cublas.cublas import build

print(build(force="--force" in sys.argv[1:]))

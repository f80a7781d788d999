"""`python -m kiln.runtime.disco [--force]`: build Kiln's NCCL backend into the cache now and
print its path (to copy the cache to a machine that has no TVM headers to build it with)."""

import sys

from kiln.runtime.disco.nccl import build

print(build(force="--force" in sys.argv[1:]))

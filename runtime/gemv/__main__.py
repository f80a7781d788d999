"""`python -m kiln.runtime.gemv [--arch sm_80,sm_90] [--force]`: build Kiln's decode GEMV extern
into the cache now and print its path (to copy the cache to a machine that has no nvcc to build
it)."""

import argparse

from kiln.runtime.gemv.gemv import DEFAULT_ARCHS, build

parser = argparse.ArgumentParser(prog="python -m kiln.runtime.gemv")
parser.add_argument("--arch", default=",".join(DEFAULT_ARCHS), help="comma-separated sm_NN list")
parser.add_argument("--force", action="store_true", help="rebuild even if the cache has it")
args = parser.parse_args()
print(build([a.strip() for a in args.arch.split(",") if a.strip()], force=args.force))

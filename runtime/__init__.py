"""The thin runtime: loads artifacts and runs them with only the TVM runtime (no tvm.relax,
no kiln.compiler). `Engine` batches many requests; `Model` (kiln.load) is its one-call form."""

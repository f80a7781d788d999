"""LocalExecutor's uploads: copied into staging buffers that are allocated once and reused round
robin (no device allocation, hence no CUDA free, per call), a pass's inputs each in a slot of
its own."""

from __future__ import annotations

import numpy as np

from kiln.runtime.artifact import read_manifest
from kiln.runtime.executor import STAGING_SLOTS, LocalExecutor


def test_uploads_reuse_buffers_and_keep_a_pass_apart(artifact):
    ex = LocalExecutor(read_manifest(artifact("llama")), "cpu")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 1000, (1, 3 + i)).astype("int32") for i in range(STAGING_SLOTS)]
    staged = [ex.upload(a) for a in arrays]
    # the inputs of one pass (up to STAGING_SLOTS of them) are all still intact
    for a, t in zip(arrays, staged, strict=True):
        assert t.shape == a.shape and str(t.dtype) == "int32"
        np.testing.assert_array_equal(t.numpy(), a)
    # the next round reuses the same memory, with the new values
    again = [ex.upload(np.full((1, 2), i, "float32")) for i in range(STAGING_SLOTS)]
    assert [t.data_ptr() for t in again] == [t.data_ptr() for t in staged]
    for i, t in enumerate(again):
        np.testing.assert_array_equal(t.numpy(), np.full((1, 2), i, "float32"))
    # an array larger than its slot gets a larger buffer; an empty one a view of none
    big = rng.standard_normal((300, 100)).astype("float32")
    np.testing.assert_array_equal(ex.upload(big).numpy(), big)
    assert ex.upload(np.zeros((1, 0), "int32")).shape == (1, 0)

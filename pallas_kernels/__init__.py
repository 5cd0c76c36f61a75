"""Pallas kernels (CCA attention, grouped matmul) lowered through Triton; see issue 3. Empty until then."""

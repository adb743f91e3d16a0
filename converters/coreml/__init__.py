"""Core ML export of the torch mirror (Neural Engine) and its numpy MIL verification.

The option lists live here, free of heavy imports, so the command line can offer them without
loading numpy (whose own OpenBLAS would then count as the BLAS MLX runs on)."""

QUANTIZE = ("none", "int8", "int4-block", "palette4")
LAYOUTS = ("default", "ane")
COMPUTE_UNITS = {"ane": "CPU_AND_NE", "gpu": "CPU_AND_GPU", "all": "ALL"}

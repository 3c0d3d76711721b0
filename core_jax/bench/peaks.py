"""Peak dense FLOP/s per chip and compute dtype, for MFU (achieved FLOP/s over the peak).

Vendor numbers without structured sparsity (NVIDIA's sheets print "with sparsity" figures; the
dense peak is half of those). "float32" is the rate XLA's default matmul precision reaches for
fp32 inputs: TF32 tensor cores on NVIDIA Ampere and later (XLA:GPU's default for fp32 dots and
convolutions), and one bfloat16 pass on TPU (JAX's default precision there), so on a TPU both
dtypes share the bf16 peak. A run with `jax_default_matmul_precision=highest` does fp32 at a
fraction of these; give its peak with `--config.peak_tflops=`.

Sources (dense TFLOP/s per chip):
- NVIDIA H100 Tensor Core GPU datasheet: H100 SXM BF16 989.4, TF32 494.7 (1979 / 989 with
  sparsity); H100 PCIe BF16 756, TF32 378; H100 NVL BF16 835, TF32 418.
- NVIDIA H200 Tensor Core GPU datasheet: H200 SXM BF16 989, TF32 494 (same SM array as H100
  SXM; 1979 / 989 with sparsity). H200 NVL is listed at 835 / 418.
- NVIDIA A100 Tensor Core GPU datasheet: BF16 312, TF32 156 (SXM and PCIe alike).
- NVIDIA L4 Tensor Core GPU datasheet: BF16 121, TF32 60 (242 / 120 with sparsity).
- Google Cloud TPU system architecture pages: v4 275 (bf16), v5e 197, v5p 459, v6e
  (Trillium) 918.
"""

from __future__ import annotations

import re

# chip: (pattern matched against the lower-cased jax device_kind, {dtype: peak TFLOP/s})
PEAK_TFLOPS: dict[str, tuple[str, dict[str, float]]] = {
    # Specific names before the names they contain ("h100 pcie" before "h100").
    "H100 PCIe": (r"h100.*pcie", {"bfloat16": 756.0, "float32": 378.0}),
    "H100 NVL": (r"h100.*nvl", {"bfloat16": 835.0, "float32": 418.0}),
    "H100 SXM": (r"h100", {"bfloat16": 989.4, "float32": 494.7}),
    "H200 NVL": (r"h200.*nvl", {"bfloat16": 835.0, "float32": 418.0}),
    "H200": (r"h200", {"bfloat16": 989.4, "float32": 494.7}),
    "A100": (r"a100", {"bfloat16": 312.0, "float32": 156.0}),
    "L4": (r"\bl4\b", {"bfloat16": 121.0, "float32": 60.0}),
    # JAX names them "TPU v4", "TPU v5 lite" (v5e), "TPU v5" / "TPU v5p", "TPU v6 lite" (v6e).
    "TPU v6e": (r"tpu v6( lite|e)", {"bfloat16": 918.0, "float32": 918.0}),
    "TPU v5e": (r"tpu v5( lite|e)", {"bfloat16": 197.0, "float32": 197.0}),
    "TPU v5p": (r"tpu v5p?$", {"bfloat16": 459.0, "float32": 459.0}),
    "TPU v4": (r"tpu v4$", {"bfloat16": 275.0, "float32": 275.0}),
}


def chip_of(device_kind: str) -> str | None:
    """The table's name for a jax `device_kind` (e.g. "NVIDIA H100 80GB HBM3" -> "H100 SXM"),
    or None for a chip it does not know (and for CPUs)."""
    kind = device_kind.strip().lower()
    for chip, (pattern, _) in PEAK_TFLOPS.items():
        if re.search(pattern, kind):
            return chip
    return None


def peak_flops(device_kind: str, dtype: str, given_tflops: float = 0.0) -> float | None:
    """Peak dense FLOP/s of one chip for `dtype` ("bfloat16", "float32"; "float16" counts as
    bfloat16): `given_tflops` when positive, else the table's, else None."""
    if given_tflops > 0:
        return given_tflops * 1e12
    chip = chip_of(device_kind)
    if chip is None:
        return None
    peaks = PEAK_TFLOPS[chip][1]
    key = "bfloat16" if dtype == "float16" else dtype
    return peaks[key] * 1e12 if key in peaks else None

"""MFU: the chip from jax's device name, its peak for the dtype, achieved FLOP/s over it in the
bench's results and tables; the cost per concept when C concepts are packed."""

import pytest

from core_jax import bench
from core_jax.bench import suite


@pytest.mark.parametrize("device_kind, chip", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", None),  # not an L4
    ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"),
    ("TPU v5e", "TPU v5e"),
    ("TPU v5", "TPU v5p"),
    ("TPU v5p", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e"),
    ("cpu", None),
])
def test_chip_from_device_kind(device_kind, chip):
    assert bench.chip_of(device_kind) == chip


def test_peaks_by_dtype_and_given():
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4e12)
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "float32") == pytest.approx(494.7e12)
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB", "float16") == pytest.approx(312e12)
    assert bench.peak_flops("TPU v5 lite", "float32") == bench.peak_flops("TPU v5 lite",
                                                                          "bfloat16")
    assert bench.peak_flops("cpu", "float32") is None
    assert bench.peak_flops("cpu", "float32", given_tflops=2.5) == pytest.approx(2.5e12)
    assert bench.peak_flops("NVIDIA H200", "bfloat16", given_tflops=100) == pytest.approx(1e14)
    for _, peaks in bench.PEAK_TFLOPS.values():
        assert set(peaks) == {"bfloat16", "float32"}
        assert peaks["bfloat16"] >= peaks["float32"] > 0


def _result(concepts: int, median: float, **fields) -> bench.Result:
    return bench.Result(variant="core", framework="jax", preset="tiny", batch=concepts,
                        steps=3, median_s=median, min_s=median, max_s=median,
                        examples_per_s=concepts / median, concepts=concepts, **fields)


def test_mfu_in_the_table():
    results = [_result(1, 1.0, flops=4e12, flops_per_s=4e12, mfu=0.4), _result(1, 1.0)]
    header, _, with_peak, without = bench.format_table(results).splitlines()
    column = header.split(" | ").index("MFU %")
    assert with_peak.split(" | ")[column] == "40.0"
    assert without.split(" | ")[column] == "-"


def test_scaling_reports_the_cost_per_concept(monkeypatch):
    step_s = {1: 1.0, 2: 1.2, 4: 1.6, 8: 2.4}  # what packing buys: the step grows slower than C

    def measure(setup, preset, variant, *, steps, warmup, peak_flops=None, **kwargs):
        count = setup
        return _result(count, step_s[count], flops_per_s=1e12,
                       mfu=1e12 / peak_flops if peak_flops else None)

    monkeypatch.setattr(suite, "measure_jax", measure)
    monkeypatch.setattr(suite, "with_concepts", lambda setup, count, rows: count)
    results = suite.run_scaling("tiny", [8, 1, 4, 2], batch_per_concept=1, steps=3, setup=object(),
                                peak_flops=4e12)
    assert [r.concepts for r in results] == [1, 2, 4, 8]
    assert [r.per_concept_s for r in results] == pytest.approx([1.0, 0.6, 0.4, 0.3])
    assert [r.per_concept_ratio for r in results] == pytest.approx([1.0, 0.6, 0.4, 0.3])
    assert [r.ratio_to_ti for r in results] == pytest.approx([1.0, 1.2, 1.6, 2.4])
    assert all(r.mfu == 0.25 for r in results)
    assert "0.300 s per concept-step, 0.30 x C = 1's" in results[-1].note

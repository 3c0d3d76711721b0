"""The one run loop and the mesh it runs on: a run that goes non-finite in a pack is reported
and the others finish as if alone; the (concept, data) mesh fits the machine by itself."""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_methods import micro_sweep  # noqa: I001 (a sibling test module)

from core_jax.errors import InputError
from core_jax.train.parallel import fit_mesh, valid_concept_shards


def test_valid_concept_shards():
    # 8 devices, pack 4, batch 2: concepts must split so that the rest of the devices divide 2.
    assert valid_concept_shards(8, 4, [2]) == [4]
    assert valid_concept_shards(8, 8, [2, 4]) == [4, 8]
    assert valid_concept_shards(8, 1, [8]) == [1]
    assert valid_concept_shards(8, 3, [2]) == []


@pytest.mark.skipif(jax.device_count() != 8, reason="needs the 8 virtual devices of conftest")
def test_the_mesh_fits_the_machine_by_itself():
    mesh, line = fit_mesh(4, [2])
    assert dict(mesh.shape) == {"concept": 4, "data": 2}
    assert line == "mesh: {'concept': 4, 'data': 2} (concept x data)"
    # One run of batch 6 cannot use 8 devices: it takes the 6 that split it, and says so.
    mesh, line = fit_mesh(1, [6, 4])
    assert dict(mesh.shape) == {"concept": 1, "data": 2}
    assert line.endswith("2 of 8 devices: batch 4 and 6 with pack 1 splits over no more")
    with pytest.raises(InputError) as err:
        fit_mesh(4, [2], concept_shards=1)
    assert str(err.value) == (
        "sweep.concept_shards 1 does not fit 8 devices with pack 4 and batch 2: "
        "--config.sweep.concept_shards=4 works"
    )


@pytest.mark.slow
def test_a_failed_run_is_reported_and_its_pack_finishes(tmp_path):
    """Four settings of one concept in one pack; one learns at 1e30, so after its first update
    every step is NaN. It is stopped and reported with its stage, step and terms; the other
    three finish and equal the same runs trained alone."""
    from core_jax.train.loop import train
    from core_jax.train.sweep import sweep

    config = micro_sweep(settings=(
        dict(name="a", overrides={"stage1.lambda_attn": 0.05}),
        dict(name="b", overrides={"stage1.lambda_attn": 0.5}),
        dict(name="explodes", overrides={"stage1.learning_rate": 1e30}),
        dict(name="c", overrides={"stage1.lambda_emb": 0.01}),
    ))
    config.sweep.concepts = config.sweep.concepts[:1]
    config.max_nonfinite = 2
    summary = sweep(config, tmp_path)
    assert summary["failed"] == ["chelsea__explodes"]
    results = {r["run"]: r for r in summary["results"]}
    failure = results["chelsea__explodes"]["failure"]
    assert (failure["stage"], failure["step"]) == (1, 3)  # steps 2 and 3 skipped
    assert "loss" in failure["terms"] and "diffusion" in failure["terms"]
    csv = (tmp_path / "results.csv").read_text()
    assert "chelsea__explodes" in csv and "failed" in csv
    for name in ("chelsea__a", "chelsea__b", "chelsea__c"):
        assert results[name]["status"] == "done" and results[name]["step"] == 4
        folder = tmp_path / "runs" / name
        saved = json.loads((folder / "config.json").read_text())
        train(ml_collections.ConfigDict(saved), tmp_path / "alone" / name)
        # Packed over (4 concepts x 2 rows) devices vs alone over 2: fp32 summation order.
        np.testing.assert_allclose(
            load_file(tmp_path / "alone" / name / "learned_embeds.safetensors")["<s*>"],
            load_file(folder / "learned_embeds.safetensors")["<s*>"], rtol=2e-5, atol=1e-6,
        )


def test_the_summary_lists_each_file_a_method_exported(tmp_path):
    from core_jax import export
    from core_jax.config import base_config
    from core_jax.train import loop

    config = base_config()
    config.concept.name = "my cat"
    token_a1111 = tmp_path / "a1111" / f"{export.file_stem('my cat')}.safetensors"
    method_files = [tmp_path / export.LORA_NAME, tmp_path / export.XTI_NAME,
                    tmp_path / export.CUSTOM_DIFFUSION_BIN_NAME,
                    tmp_path / "a1111" / "lora" / "my_cat.safetensors"]
    for path in [tmp_path / export.LEARNED_EMBEDS_NAME, token_a1111, *method_files]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    outputs = loop._run_outputs(tmp_path, config)
    assert outputs.method_files == sorted(method_files)
    text = loop.summary(outputs)
    assert all(str(path) in text for path in method_files)
    assert text.count(export.LEARNED_EMBEDS_NAME) == 1

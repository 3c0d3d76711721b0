"""The benchmark command and the chunked (flash-style) attention it made the default on CPU.

No timing is asserted anywhere: the machine is shared and timings are noise here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax import _runtime
from core_jax.models import attention

REPO = Path(__file__).resolve().parent.parent


def _qkv(batch: int, n_q: int, n_k: int, heads: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, n_q, heads, dim)) * 2.0  # peaked softmax rows too
    k, v = (rng.standard_normal((batch, n_k, heads, dim)) for _ in range(2))
    return tuple(jnp.asarray(a, jnp.float32) for a in (q, k, v))


@pytest.mark.parametrize(
    "n_q, n_k, chunk",
    [
        (64, 64, 16),  # several whole chunks
        (100, 100, 32),  # the last chunk is padded
        (37, 77, 8),  # cross-attention shapes, keys not a multiple of anything
        (5, 9, 64),  # fewer queries than one chunk
    ],
)
def test_chunked_attention_equals_explicit_values_and_gradients(n_q, n_k, chunk):
    q, k, v = _qkv(2, n_q, n_k, 3, 8)
    scale = 8**-0.5
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape[:3] + (8,)),
                            jnp.float32)

    def value_and_grads(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v), q, k, v)
        return out, vjp(cotangent)

    chunked = jax.jit(lambda: value_and_grads(
        lambda q, k, v: attention.chunked_attention(q, k, v, scale, chunk)))()
    explicit = jax.jit(lambda: value_and_grads(
        lambda q, k, v: attention.explicit_attention(q, k, v, scale)))()
    chex.assert_trees_all_close(chunked, explicit, rtol=2e-5, atol=2e-6)


def test_chunked_attention_in_group_slices_equals_explicit(monkeypatch):
    # A small block budget makes the step take 2 of the 6 batch x head groups at a time.
    monkeypatch.setattr(attention, "_BLOCK_ELEMENTS", 2 * 16 * 40)
    assert attention._group_chunk(6, 16, 40) == 2
    q, k, v = _qkv(2, 40, 40, 3, 4, seed=3)

    def loss(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), (0, 1, 2))

    chunked = jax.jit(loss(lambda q, k, v: attention.chunked_attention(q, k, v, 0.5, 16)))
    explicit = jax.jit(loss(lambda q, k, v: attention.explicit_attention(q, k, v, 0.5)))
    chex.assert_trees_all_close(chunked(q, k, v), explicit(q, k, v), rtol=2e-5, atol=2e-6)


def test_chunked_attention_keeps_the_value_dtype():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, 70, 70, 2, 4))
    out = attention.chunked_attention(q, k, v, 0.5, chunk=32)
    assert out.dtype == jnp.bfloat16
    reference = attention.explicit_attention(*(x.astype(jnp.float32) for x in (q, k, v)), 0.5)
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=2e-2, atol=2e-2)


def _has_loop(fn, *args) -> bool:
    # A new function object each time: jit caches traces by function, and the choice of form
    # happens at trace time.
    return "stablehlo.while" in jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


def test_dispatch_chunks_long_sequences_on_cpu_unless_told_not_to():
    long = _qkv(1, 2 * attention.CHUNK + 3, 2 * attention.CHUNK + 3, 2, 4)
    short = _qkv(1, attention.CHUNK, attention.CHUNK, 2, 4)

    def attend(q, k, v):
        return attention.dot_product_attention(q, k, v, 0.5)

    assert _has_loop(attend, *long)
    assert not _has_loop(attend, *short)
    with attention.explicit_attention_only():
        assert not _has_loop(attend, *long)
    np.testing.assert_allclose(
        attend(*long), attention.explicit_attention(*long, 0.5), rtol=2e-5, atol=2e-6
    )


def test_allocator_choice(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(_runtime, "find_library", lambda kind: f"/lib/lib{kind}.so")
    assert _runtime.allocator_environment({"CORE_JAX_ALLOCATOR": "system"}) is None
    assert _runtime.allocator_environment({_runtime.APPLIED_ENV: "tcmalloc:/x"}) is None
    assert _runtime.allocator_environment({"JAX_PLATFORMS": "cuda"}) is None
    assert _runtime.allocator_environment({"LD_PRELOAD": "/opt/libjemalloc.so.2"}) is None
    auto = _runtime.allocator_environment({"JAX_PLATFORMS": "cpu", "LD_PRELOAD": "/x.so"})
    assert auto["LD_PRELOAD"] == "/lib/libtcmalloc.so /x.so"
    jemalloc = _runtime.allocator_environment({"CORE_JAX_ALLOCATOR": "jemalloc"})
    assert jemalloc["LD_PRELOAD"] == "/lib/libjemalloc.so" and "retain:true" in jemalloc[
        "MALLOC_CONF"]
    tunables = _runtime.allocator_environment(
        {"CORE_JAX_ALLOCATOR": "tunables", "GLIBC_TUNABLES": "glibc.cpu.x=1"})
    assert tunables["GLIBC_TUNABLES"].startswith("glibc.cpu.x=1:glibc.malloc.arena_max=1")
    monkeypatch.setattr(_runtime, "find_library", lambda kind: None)
    fallback = _runtime.allocator_environment({"JAX_PLATFORMS": "cpu"})
    assert "glibc.malloc.mmap_max=0" in fallback["GLIBC_TUNABLES"]
    with pytest.raises(ValueError, match="CORE_JAX_ALLOCATOR"):
        _runtime.allocator_environment({"CORE_JAX_ALLOCATOR": "fast"})


def test_bench_command_emits_one_json_line_per_variant(tmp_path):
    # The CLI re-executes itself once with a better allocator (no other settings here).
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", _runtime.ALLOCATOR_ENV,
                        _runtime.APPLIED_ENV)}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [
        sys.executable, "-m", "core_jax", "bench", "--config", str(REPO / "configs/bench_tiny.py"),
        # Two variants keep the compile time down: the stage-1 step and the sampling chain.
        "--variants", "sample,ti", "--json", "--config.steps=2", "--config.warmup=0",
        "--config.sample.num_inference_steps=2", "--config.sample.chains=2",
        "--config.peak_tflops=0.001",  # a CPU has no peak in the table: MFU from the one given
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    environment = lines[0]["environment"]
    assert environment["peak_tflops"] == 0.001
    if sys.platform.startswith("linux"):
        assert environment["allocator"] != "glibc"
    results = lines[1:]
    assert [r["variant"] for r in results] == ["ti", "sample"]  # TI first, for the ratios
    for r in results:
        assert r["framework"] == "jax"
        for key in ("median_s", "min_s", "max_s", "compile_s", "lower_s", "first_call_s",
                    "flops", "flops_per_s", "peak_rss_mb"):
            assert isinstance(r[key], float) and np.isfinite(r[key]) and r[key] > 0, key
        assert r["steps"] == 2 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / 1e9)
    ti, chain = results
    assert ti["ratio_to_ti"] == 1.0 and ti["batch"] == 2
    assert chain["ratio_to_ti"] is None and chain["batch"] == 1


def test_tables_and_ratios_from_results():
    from core_jax import bench

    def result(variant, framework, median):
        return bench.Result(variant=variant, framework=framework, preset="tiny", batch=2,
                            steps=3, median_s=median, min_s=median, max_s=median,
                            examples_per_s=2 / median, flops=1e9 if framework == "jax" else None)

    results = [result("ti", "jax", 1.0), result("ti", "torch", 2.0), result("core", "jax", 1.5)]
    table = bench.format_table(results).splitlines()
    assert len(table) == 2 + len(results)
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "| ti | torch |" in table[3] and "| 1.0 |" in table[2]  # GFLOP/step
    assert bench.format_comparison(results) == "ti: JAX 1.000 s / torch 2.000 s = 0.50"
    assert json.loads(results[0].to_json())["median_s"] == 1.0


def test_packed_concepts_cost_what_their_rows_cost():
    """C concepts x b rows is C x b rows of work: XLA's FLOP count of the step with 2 concepts
    of 1 row equals 1 concept of 2 rows (the bench once packed C x (C x b) rows)."""
    from core_jax import bench

    def step_flops(setup):
        with attention.explicit_attention_only():
            program = bench.stage1_program(setup, "core")
            return bench.flops(program.jitted.lower(*program.args))

    packed = bench.with_concepts(bench.build_setup("tiny", 1, concepts=2), 2, 1)
    single = bench.with_concepts(bench.build_setup("tiny", 2), 1, 2)
    assert packed.program.batch_size == 1 and single.program.batch_size == 2
    assert packed.state.rng.shape[0] == 2 and single.state.rng.shape[0] == 1
    assert step_flops(packed) == pytest.approx(step_flops(single), rel=0.05)


def test_each_variant_is_the_program_it_names():
    """The stage-1 variants differ only in which weighted terms are present (the same weights
    as the PyTorch reference, the code's loss variants); `unet` trains each run's U-Net copy
    with the diffusion loss alone. Built, not compiled."""
    from core_jax import bench

    setup = bench.build_setup("tiny", 2)
    expected = {
        "ti": ("diffusion",),
        "emb": ("diffusion", "emb"),
        "attn": ("diffusion", "attn"),
        "core": ("diffusion", "emb", "attn"),
        "core_all": ("diffusion", "emb", "attn", "pairwise", "hinge"),
    }
    for variant, terms in expected.items():
        staged = bench.variant_setup(setup, variant)
        program = staged.program
        assert tuple(t.name for t in program.terms) == terms, variant
        assert dict(program.trains) == {"embeds": "learning_rate"} and program.batch_size == 2
        for key, weight in bench.TORCH_MATCHED_WEIGHTS.items():
            if key.removeprefix("lambda_") in terms:
                assert float(staged.numbers[key][0]) == pytest.approx(weight), (variant, key)
    unet = bench.variant_setup(setup, "unet")
    assert tuple(t.name for t in unet.program.terms) == ("diffusion",)
    assert set(unet.program.trains) == {"unet"} and "unet" in unet.state.params
    assert float(unet.numbers["learning_rate"][0]) == pytest.approx(2e-6)
    with pytest.raises(ValueError, match="not a stage-1 variant"):
        bench.stage1_program(setup, "unet")


def test_method_variants_train_only_their_groups_and_say_how_much():
    """The U-Net-side methods' steps train their own group against the shared frozen U-Net,
    with their sources' learning rates; the trainable state per run is what that group and its
    Adam moments take (LoRA's adapters: a small fraction of a U-Net copy). Built, not compiled."""
    from core_jax import bench

    setup = bench.build_setup("tiny", 2)
    sizes = {}
    for variant, group, lr in (("unet", "unet", 2e-6), ("lora", "lora", 1e-4),
                               ("svdiff", "svdiff", 1e-3), ("xti", "xti", 5e-3),
                               ("neti", "neti", 8e-3)):
        staged = bench.variant_setup(setup, variant)
        assert set(staged.program.trains) == {group} and group in staged.state.params, variant
        assert tuple(t.name for t in staged.program.terms) == ("diffusion",)
        assert float(staged.numbers["learning_rate"][0]) == pytest.approx(lr)
        params = sum(x.nbytes for x in jax.tree.leaves(staged.state.params[group])) / 2**20
        sizes[variant] = bench.trainable_state_mb(staged)
        # The group and Adam's two moments.
        assert sizes[variant] == pytest.approx(3 * params, rel=0.01, abs=0.01), variant
    assert "svdiff" in bench.variant_setup(setup, "svdiff").frozen  # the SVD, shared
    assert sizes["lora"] < 0.2 * sizes["unet"] and sizes["svdiff"] < 0.2 * sizes["unet"]


def test_torch_reference_loads_one_way_and_knows_the_same_variants():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from core_jax import bench

    reference = bench.load_torch_reference()
    assert bench.load_torch_reference() is reference
    assert tuple(reference.VARIANTS) == bench.TORCH_VARIANTS
    ours = dict(bench.TORCH_MATCHED_WEIGHTS)
    margin = ours.pop("hinge_margin")
    lambdas, reference_margin = reference.LAMBDAS, reference.HINGE_MARGIN
    assert lambdas == {key.removeprefix("lambda_"): value for key, value in ours.items()}
    assert reference_margin == margin


def test_bench_runs_in_bfloat16_and_says_so():
    """The compute dtype for accelerator runs (bench_sd15 in bf16): the step runs, its result
    records the dtype, and the U-Net really computes in it."""
    from core_jax import bench

    setup = bench.build_setup("tiny", 1, dtype="bfloat16")
    assert setup.unet.dtype == jnp.bfloat16
    result = bench.measure_jax(setup, "tiny", "ti", steps=1, warmup=0)
    assert result.dtype == "bfloat16" and np.isfinite(result.median_s) and result.flops > 0
    # The step donated its state; the setup every variant starts from is intact.
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(setup.args()))
    assert json.loads(result.to_json())["dtype"] == "bfloat16"


def test_dreambooth_and_custom_diffusion_variants_read_what_they_need():
    """DreamBooth's step has the prior term on a class pool; Custom Diffusion's trains its K/V
    and S* with the masked loss on view masks (stood in by `method_data`); AttnDreamBooth's
    stage 2 trains the cross-attention projections with both regularizer terms. Built, not
    compiled."""
    from core_jax import bench

    setup = bench.build_setup("tiny", 2)
    booth = bench.variant_setup(setup, "dreambooth")
    assert set(booth.program.trains) == {"unet"}
    assert {t.name for t in booth.program.terms} == {"diffusion", "prior"}
    assert booth.data.class_mean is not None and setup.data.class_mean is None
    custom = bench.variant_setup(setup, "custom_diffusion")
    assert set(custom.program.trains) == {"custom_diffusion", "embeds"}
    assert "loss_mask" in custom.program.needs and custom.data.latent_mask is not None
    # The K/V and their Adam moments: far below a U-Net copy.
    assert bench.trainable_state_mb(custom) < 0.2 * bench.trainable_state_mb(booth)
    # ClassDiffusion: the same groups, the semantic term on stood-in phrases.
    classdiff = bench.variant_setup(setup, "class_diffusion")
    assert set(classdiff.program.trains) == {"custom_diffusion", "embeds"}
    assert {t.name for t in classdiff.program.terms} == {"diffusion", "spl"}
    assert classdiff.data.phrase_ids.shape == (1, 2, 77)
    # TextBoost: S* and the text encoder's adapters, the knowledge term on stood-in prompts.
    boost = bench.variant_setup(setup, "textboost")
    assert set(boost.program.trains) == {"embeds", "text_lora"}
    assert {t.name for t in boost.program.terms} == {"diffusion", "kp"}
    assert boost.data.kp_frozen.shape[:2] == boost.data.kp_ids.shape[:2]
    # PALP: S* and the U-Net's adapters, its term on stood-in target and empty prompts.
    aligned = bench.variant_setup(setup, "palp")
    assert set(aligned.program.trains) == {"embeds", "lora"}
    assert {t.name for t in aligned.program.terms} == {"diffusion", "palp"}
    assert {"palp_teacher", "palp_student"} <= aligned.program.needs
    assert aligned.data.target_hidden.shape == aligned.data.cat_hidden[:, 0].shape
    assert float(aligned.numbers["learning_rate"][0]) == pytest.approx(5e-5)
    attn = bench.variant_setup(setup, "attn_dreambooth")
    assert set(attn.program.trains) == {"cross_attention"}
    assert {t.name for t in attn.program.terms} == {"diffusion", "attn_mean", "attn_var"}
    assert {"caption_stats", "caption_stats_var"} <= attn.program.needs

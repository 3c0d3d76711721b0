"""Text-to-image sampling: determinism, guidance, learned vectors, compile-once, shapes.

All on the tiny preset (64 px images, 8x8 latents) with random weights and few steps. Most tests
share one prompt batch shape so they share one compiled program.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax.diffusion import sample
from core_jax.sample import (
    Pipeline,
    encode_prompts,
    generate,
    generate_latents,
    random_pipeline,
)
from core_jax.text import add_placeholder_tokens, load_tokenizer

STEPS = 3
PROMPTS = ["a photo of <s*> in the jungle", "a photo of a dog"]  # only the first uses <s*>


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return random_pipeline("tiny", seed=0, num_vectors=1)


def _learned(seed: int, pipeline: Pipeline) -> np.ndarray:
    shape = (len(pipeline.placeholder_ids), pipeline.embed_dim)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _token_rows(pipeline: Pipeline, words: list[str]) -> np.ndarray:
    """The frozen table's embeddings [len(words), D] of single-token words."""
    table = pipeline.text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    ids = [pipeline.tokenizer.encode(w, add_special_tokens=False) for w in words]
    assert all(len(i) == 1 for i in ids)
    return np.asarray(table)[[i[0] for i in ids]]


def test_same_seed_same_images_other_seed_other_images(pipeline: Pipeline) -> None:
    learned = _learned(0, pipeline)
    a = generate(pipeline, PROMPTS, learned, steps=STEPS, seed=0)
    b = generate(pipeline, PROMPTS, learned, steps=STEPS, seed=0)
    c = generate(pipeline, PROMPTS, learned, steps=STEPS, seed=1)
    np.testing.assert_array_equal(a, b)  # the same compiled program on the same inputs
    assert (a != c).mean() > 0.5


def test_output_shape_dtype_and_images_per_prompt(pipeline: Pipeline) -> None:
    images = generate(
        pipeline, ["a photo of a dog"], None, num_images_per_prompt=2, steps=2,
        sampler="dpmpp_2m", height=64, width=128,
    )
    assert images.shape == (2, 64, 128, 3) and images.dtype == np.uint8
    assert (images[0] != images[1]).mean() > 0.5  # each image draws its own noise
    default = generate(pipeline, ["a photo of a dog", "a cat"], None, steps=STEPS)
    assert default.shape == (2, 64, 64, 3)  # U-Net sample_size 8 x VAE factor 8


def test_guidance_scale_one_is_the_conditional_model_alone(pipeline: Pipeline) -> None:
    learned = _learned(0, pipeline)
    got = generate_latents(pipeline, PROMPTS, learned, steps=STEPS, guidance_scale=1.0, seed=5)

    context = jnp.asarray(encode_prompts(pipeline, PROMPTS, learned))
    x_T = jax.random.normal(jax.random.split(jax.random.key(5))[0], got.shape)
    unet, unet_params = pipeline.unet, pipeline.unet_params

    def conditional(x: jax.Array, t: jax.Array) -> jax.Array:
        return unet.apply({"params": unet_params}, x, t, context)

    want = np.asarray(sample(conditional, x_T, pipeline.schedule, STEPS, "ddim"), np.float64)
    # Not bitwise: the guided run evaluates the U-Net on a doubled batch (XLA may block its
    # reductions differently: ~1e-6 relative per the argument in test_models.py, 1e-5 at worst)
    # and forms uncond + 1 * (cond - uncond) (two roundings of O(1) values). DDIM is linear in
    # the prediction with coefficients that carry its scale into the latents' (which reach ~13
    # here), so the gap is ~1e-6 of the latents' largest magnitude (measured 2.7e-7); 1e-5 of
    # it leaves room, while guidance 7.5 moves latents by O(1).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    guided = generate_latents(pipeline, PROMPTS, learned, steps=STEPS, guidance_scale=7.5, seed=5)
    assert np.abs(guided - got).max() > 1e-2


def test_learned_vectors_reach_only_prompts_with_the_placeholder(pipeline: Pipeline) -> None:
    a = generate(pipeline, PROMPTS, _learned(1, pipeline), steps=STEPS, seed=0)
    b = generate(pipeline, PROMPTS, _learned(2, pipeline), steps=STEPS, seed=0)
    assert (a[0] != b[0]).mean() > 0.1
    # Rows are computed independently (per-row sums in a fixed order), so the same program
    # gives row 1, whose inputs are the same numbers, bitwise the same.
    np.testing.assert_array_equal(a[1], b[1])
    # Without any placeholder in the batch the vectors may be omitted; the result is the same
    # (zero vectors of the same shape stand in: the same program, bitwise).
    plain = ["a photo of a cat", "a photo of a dog"]
    np.testing.assert_array_equal(
        generate(pipeline, plain, None, steps=STEPS),
        generate(pipeline, plain, _learned(3, pipeline), steps=STEPS),
    )


def test_second_call_with_same_shapes_does_not_recompile(pipeline: Pipeline) -> None:
    generate(pipeline, PROMPTS, _learned(0, pipeline), steps=STEPS, seed=0)
    compiled = pipeline._sample_fn._cache_size()
    images = generate(
        pipeline, ["<s*> on a beach", "a red <s*>"], _learned(4, pipeline), steps=STEPS, seed=9,
        guidance_scale=3.0,
    )
    assert images.shape == (2, 64, 64, 3)
    assert pipeline._sample_fn._cache_size() == compiled


def test_placeholder_is_the_learned_vector_in_the_prompt(pipeline: Pipeline) -> None:
    # A learned vector equal to the table row of "dog" must read exactly as the word "dog".
    got = encode_prompts(pipeline, ["a photo of <s*>"], _token_rows(pipeline, ["dog"]))
    want = encode_prompts(pipeline, ["a photo of dog"])
    # Same batch shape, so the same compiled program (the placeholder path always runs, with
    # zero vectors when there are none), on the same numbers: bitwise equal.
    np.testing.assert_array_equal(got, want)
    assert got.shape == (1, 77, pipeline.embed_dim)


def test_bare_placeholder_expands_to_all_vectors(pipeline: Pipeline) -> None:
    tokenizer = load_tokenizer()
    two = dataclasses.replace(
        pipeline, tokenizer=tokenizer,
        placeholder_ids=tuple(add_placeholder_tokens(tokenizer, "<s*>", 2)),
    )
    learned = _token_rows(two, ["red", "dog"])
    got = encode_prompts(two, ["a <s*> toy", "a <s*> <s*>_1 toy"], learned)
    # The reference in the same batch shape (2 prompts), so the same compiled program on the
    # same numbers: bitwise equal. (Against a batch of 1 the programs differ, XLA blocks the
    # encoder's matrix products otherwise, and rows came out ~1 ulp apart: an atol of 1e-6 on
    # values up to 2.6 failed by chance.)
    want = encode_prompts(two, ["a red dog toy"] * 2)
    np.testing.assert_array_equal(got, want)


def test_pipeline_without_placeholder_tokens_is_the_base_model(pipeline: Pipeline) -> None:
    base = dataclasses.replace(pipeline, tokenizer=load_tokenizer(), placeholder_ids=())
    prompts = ["a photo of a dog"]
    # The same ids, zero stand-in vectors of the same shape on both: the same program, bitwise.
    np.testing.assert_array_equal(encode_prompts(base, prompts), encode_prompts(pipeline, prompts))
    with pytest.raises(ValueError, match="no placeholder tokens"):
        encode_prompts(base, prompts, np.zeros((1, 32), np.float32))


def test_bad_arguments_are_refused(pipeline: Pipeline) -> None:
    with pytest.raises(ValueError, match="multiples of the VAE factor 8"):
        generate(pipeline, PROMPTS, _learned(0, pipeline), height=60)
    with pytest.raises(ValueError, match=r"multiples of 64 \(VAE factor 8 x U-Net factor 8\)"):
        generate(pipeline, PROMPTS, _learned(0, pipeline), width=72)
    with pytest.raises(ValueError, match="no learned vectors"):
        generate(pipeline, PROMPTS, None)
    with pytest.raises(ValueError, match=r"\[V, D\] = \[1, 32\]"):
        generate(pipeline, PROMPTS, np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="sampler must be one of"):
        generate(pipeline, PROMPTS, _learned(0, pipeline), sampler="euler")

"""core_jax.losses: hand values, numpy references, masking, invariances, gradients, jit/vmap."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from core_jax import losses

B, T, D, L = 3, 6, 5, 4
S2 = 1 / np.sqrt(2)

# Tolerances, from what fp32 arithmetic can do here. Every fp32 operation rounds its result to
# within U = 2^-24 = 6e-8 relative. The losses come in two kinds:
#
# * Means of non-negative terms (diffusion MSE, squared attention differences, min-SNR weights,
#   norms): nothing cancels, so the result is off by at most ~(n + 3) U relative for n terms of a
#   few operations each. n <= 90 here: <= 6e-6 in the worst case (~1e-7 seen). RTOL = 1e-5,
#   applied relative to the largest magnitude of the expected value.
# * Terms made of cosines (1 - cos, |S_obj - S_cat|, margin - cos): a cosine of two normalised
#   D-vectors (D <= 5) is off by at most ~(D + 4) U = 5.4e-7 *absolute*, however small the loss
#   it feeds (1 - cos cancels), and means keep that bound. COS_ATOL = 2e-6, ~4x the bound.
#
# Either is far below what a real mistake does (a wrong axis, mask or weight: 1e-3 and up).
RTOL = 1e-5
COS_ATOL = 2e-6
COSINE_CASES = {"embedding_paper", "embedding_code", "pairwise", "hinge", "semantic", "knowledge"}


def assert_close(got, want, cosine=False):
    """got == want within the fp32 rounding bound of the computation's kind (see above)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    atol = COS_ATOL if cosine else RTOL * max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


# ---------------------------------------------------------------- numpy references (loops)


def np_cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def ref_embedding(h_obj, h_cat, mask, variant):
    per_example = []
    for b in range(h_obj.shape[0]):
        ctx = np.flatnonzero(mask[b])
        if variant == "paper":
            terms = [1 - np_cos(h_obj[b, t], h_cat[b, t]) for t in ctx]
        else:
            terms = [1 - np_cos(h_obj[b, ctx, d], h_cat[b, ctx, d]) for d in range(h_obj.shape[2])]
        per_example.append(np.mean(terms) if ctx.size else 0.0)
    return np.mean(per_example)


def ref_attention(s_obj, s_cat, mask, variant):
    per_example = []
    for b in range(s_obj.shape[1]):
        ctx = np.flatnonzero(mask[b])
        if variant == "paper":
            diff = s_obj[:, b, ctx].mean(0) - s_cat[:, b, ctx].mean(0)
            per_example.append(np.mean(diff**2))
        else:
            layers = [
                np.mean((s_obj[l, b, ctx] - s_cat[l, b, ctx]) ** 2) for l in range(len(s_obj))
            ]
            per_example.append(np.mean(layers))
    return np.mean(per_example) if variant == "paper" else np.sum(per_example)


def ref_pairwise(h_obj, h_cat, mask):
    per_example = []
    for b in range(h_obj.shape[0]):
        ctx = np.flatnonzero(mask[b])
        s_obj = np.array([[np_cos(h_obj[b, i], h_obj[b, j]) for j in ctx] for i in ctx])
        s_cat = np.array([[np_cos(h_cat[b, i], h_cat[b, j]) for j in ctx] for i in ctx])
        per_example.append(np.mean(np.abs(s_obj - s_cat)))
    return np.mean(per_example)


# ---------------------------------------------------------------- shared inputs


def make_inputs(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    mask = rng.random((B, T)) < 0.6
    mask[:, 0] = True  # at least one context token per example
    mask[0, 3] = False  # S* position
    f = lambda *shape: rng.normal(size=shape).astype(dtype)  # noqa: E731
    u = lambda *shape: rng.uniform(0.01, 0.3, size=shape).astype(dtype)  # noqa: E731
    return {
        "mask": mask,
        "h_obj": f(B, T, D),
        "h_cat": f(B, T, D),
        "s_obj": u(L, B, T),
        "s_cat": u(L, B, T),
        "out": f(B, 2, 2, 3),
        "tgt": f(B, 2, 2, 3),
        "snr": np.array([0.3, 4.0, 40.0], dtype)[:B],
        "learned": f(2, 3, D),
        "super": f(D),
        "ref_norm": u(2, 3) * 10,
        "pooled_obj": f(B, D),
        "pooled_cls": f(B, D),
        "t_mean": u(L, B, 1),
        "t_var": u(L, B, 1),
    }


# name -> (loss, input keys, n_diff); the first n_diff inputs are the differentiable ones. Built
# once at import so that the jit caches below are shared by every test (compiles dominate runtime).
CASES = {
    "diffusion": (losses.diffusion_loss, ("out", "tgt"), 2),
    "diffusion_min_snr_eps": (
        functools.partial(losses.diffusion_loss, min_snr_gamma=5.0),
        ("out", "tgt", "snr"),
        2,
    ),
    "diffusion_min_snr_v": (
        functools.partial(losses.diffusion_loss, min_snr_gamma=5.0, prediction_type="v_prediction"),
        ("out", "tgt", "snr"),
        2,
    ),
    "embedding_paper": (losses.core_embedding_loss, ("h_obj", "h_cat", "mask"), 2),
    "embedding_code": (
        functools.partial(losses.core_embedding_loss, variant="code"),
        ("h_obj", "h_cat", "mask"),
        2,
    ),
    "attention_paper": (losses.core_attention_loss, ("s_obj", "s_cat", "mask"), 2),
    "attention_code": (
        functools.partial(losses.core_attention_loss, variant="code"),
        ("s_obj", "s_cat", "mask"),
        2,
    ),
    "pairwise": (losses.pairwise_loss, ("h_obj", "h_cat", "mask"), 2),
    "hinge": (functools.partial(losses.hinge_loss, margin=0.3), ("learned", "super"), 2),
    "rescale_to_norm": (losses.rescale_to_norm, ("learned", "ref_norm"), 2),
    "semantic": (losses.semantic_preservation_loss, ("pooled_obj", "pooled_cls"), 2),
    "knowledge": (losses.knowledge_preservation_loss, ("h_obj", "h_cat", "mask"), 2),
    "attention_mean_var": (
        losses.attention_mean_var_loss,
        ("s_obj", "s_cat", "t_mean", "t_var", "mask"),
        4,
    ),
}
JIT = {name: jax.jit(fn) for name, (fn, _, _) in CASES.items()}
VALUE_AND_GRAD = {
    name: jax.jit(jax.value_and_grad(fn, argnums=tuple(range(n))))
    for name, (fn, _, n) in CASES.items()
}


def args_of(name, x):
    return tuple(x[key] for key in CASES[name][1])


diffusion = jax.jit(losses.diffusion_loss, static_argnames=("min_snr_gamma", "prediction_type"))
embedding = jax.jit(losses.core_embedding_loss, static_argnames="variant")
attention = jax.jit(losses.core_attention_loss, static_argnames="variant")
pairwise = jax.jit(losses.pairwise_loss)
hinge = jax.jit(losses.hinge_loss)
rescale = jax.jit(losses.rescale_to_norm)


# ---------------------------------------------------------------- hand-computed values


def test_diffusion_loss_value():
    x = make_inputs()
    per_example = np.mean((x["out"].astype(np.float64) - x["tgt"]) ** 2, axis=(1, 2, 3))
    # 36 squares summed in fp32, against float64: up to (36 + 3) U = 2.3e-6 relative, which a
    # 1e-6 tolerance did not cover.
    assert_close(diffusion(x["out"], x["tgt"]), per_example.mean())


@pytest.mark.parametrize(
    "prediction_type, weights",
    [
        # snr = (0.5, 10), gamma = 5
        ("epsilon", [1.0, 0.5]),  # min(snr, 5) / snr
        ("v_prediction", [0.5 / 1.5, 5 / 11]),  # min(snr, 5) / (snr + 1)
        ("sample", [0.5, 5.0]),  # min(snr, 5)
    ],
)
def test_min_snr_weights(prediction_type, weights):
    out = np.zeros((2, 1, 2), np.float32)
    tgt = np.array([[[1.0, 3.0]], [[2.0, 2.0]]], np.float32)  # per-example MSE 5 and 4
    got = diffusion(out, tgt, np.array([0.5, 10.0]), 5.0, prediction_type)
    assert_close(got, (5 * weights[0] + 4 * weights[1]) / 2)  # weights like 1/3 round
    # snr is ignored without gamma. Small integers and halves: every operation is exact.
    assert float(diffusion(out, tgt, np.array([0.5, 10.0]), None, prediction_type)) == 4.5


def test_min_snr_zero_terminal_snr_is_finite():
    out, tgt = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    snr = np.array([0.0, 20.0], np.float32)
    eps = diffusion(out, tgt, snr, 5.0, "epsilon")
    v = diffusion(out, tgt, snr, 5.0, "v_prediction")
    assert float(eps) == (1.0 + 0.25) / 2  # weight -> 1 as snr -> 0; 5 / 20 is exact
    assert_close(v, (0.0 + 5 / 21) / 2)  # 5 / 21 rounds
    grads = jax.grad(diffusion)(out, tgt, snr, 5.0)
    chex.assert_tree_all_finite(grads)


def test_embedding_loss_hand_values():
    # context: tokens 0 and 1; token 2 (S*) holds junk
    h_obj = np.array([[[1.0, 0.0], [0.0, 1.0], [9.0, -9.0]]], np.float32)
    h_cat = np.array([[[2.0, 0.0], [1.0, 1.0], [-5.0, 3.0]]], np.float32)
    mask = np.array([[True, True, False]])
    # paper: per-token cos over features = 1, 1/sqrt2
    assert_close(embedding(h_obj, h_cat, mask, "paper"), (1 - S2) / 2, cosine=True)
    # code: channel 0 columns (1, 0) vs (2, 1): cos 2/sqrt5; channel 1 columns (0, 1) vs (0, 1): 1
    assert_close(embedding(h_obj, h_cat, mask, "code"), (1 - 2 / np.sqrt(5)) / 2, cosine=True)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_embedding_loss_matches_numpy(variant):
    x = make_inputs(seed=1)
    want = ref_embedding(x["h_obj"].astype(np.float64), x["h_cat"], x["mask"], variant)
    got = embedding(x["h_obj"], x["h_cat"], x["mask"], variant)
    assert_close(got, want, cosine=True)


def test_attention_loss_hand_values():
    s_obj = np.array([[[0.1, 0.5, 0.3]], [[0.3, 0.9, 0.1]]], np.float32)  # [L=2, B=1, T=3]
    s_cat = np.array([[[0.2, 0.0, 0.2]], [[0.2, 0.0, 0.0]]], np.float32)
    mask = np.array([[True, False, True]])
    # The decimals are rounded to fp32 (U each); a difference of 0.1 between values <= 0.3
    # carries ~5 U of that, its square ~10 U = 6e-7 relative: inside RTOL.
    # paper: layer means obj (.2, ., .2), cat (.2, ., .1) -> ((0)^2 + (.1)^2) / 2
    assert_close(attention(s_obj, s_cat, mask, "paper"), 0.005)
    # code: layer 0 diffs (-.1, .1), layer 1 (.1, .1) -> .01 each
    assert_close(attention(s_obj, s_cat, mask, "code"), 0.01)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_attention_loss_matches_numpy(variant):
    x = make_inputs(seed=2)
    want = ref_attention(x["s_obj"].astype(np.float64), x["s_cat"], x["mask"], variant)
    got = attention(x["s_obj"], x["s_cat"], x["mask"], variant)
    # Same fp32 inputs on both sides; the layer means (of values <= 0.3) round by a few U
    # before they are subtracted, ~1e-6 relative on differences of ~0.05: inside RTOL.
    assert_close(got, want)


def test_pairwise_loss_hand_value_and_numpy():
    h_obj = np.array([[[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]]], np.float32)
    h_cat = np.array([[[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]]], np.float32)
    mask = np.array([[True, True, False]])
    # S_obj = [[1, 0], [0, 1]], S_cat = [[1, 1/sqrt2], [1/sqrt2, 1]]
    assert_close(pairwise(h_obj, h_cat, mask), 2 * S2 / 4, cosine=True)
    x = make_inputs(seed=3)
    want = ref_pairwise(x["h_obj"].astype(np.float64), x["h_cat"], x["mask"])
    got = pairwise(x["h_obj"], x["h_cat"], x["mask"])
    assert_close(got, want, cosine=True)


def test_hinge_loss_values_and_broadcasting():
    learned = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # [V=2, D=2]
    sup = np.array([1.0, 1.0], np.float32)  # cos 1/sqrt2 with both
    assert_close(hinge(learned, sup, 0.9), 0.9 - S2, cosine=True)
    assert float(hinge(learned, sup, 0.5)) == 0.0  # above the margin
    # per-vector targets [V, D] and a leading concept axis [C, V, D]
    sup_v = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)  # cos 1 and 0
    assert_close(hinge(learned, sup_v, 0.5), 0.25, cosine=True)
    assert_close(hinge(np.stack([learned, learned]), sup_v, 0.5), 0.25, cosine=True)


def test_semantic_preservation_value():
    a = np.array([[1.0, 0.0], [2.0, 0.0]], np.float32)
    b = np.array([[1.0, 1.0], [3.0, 0.0]], np.float32)
    assert_close(JIT["semantic"](a, b), (1 - S2) / 2, cosine=True)
    # a zero vector has cosine 0 with anything, and no gradient
    a[1] = 0.0
    value, grad = jax.value_and_grad(JIT["semantic"])(a, b)
    assert_close(value, (1 - S2 + 1) / 2, cosine=True)
    assert np.all(np.asarray(grad[1]) == 0)


def test_knowledge_preservation_is_a_token_mean():
    x = make_inputs(seed=4)
    h, hf, mask = x["h_obj"], x["h_cat"], x["mask"]
    terms = [1 - np_cos(h[b, t], hf[b, t]) for b in range(B) for t in np.flatnonzero(mask[b])]
    assert_close(JIT["knowledge"](h, hf, mask), np.mean(terms), cosine=True)


def test_attention_mean_var_value():
    mean = np.array([[[0.9, 0.3]]], np.float32)  # [L=1, B=1, T=2]; token 0 not a placeholder
    var = np.array([[[0.7, 0.05]]], np.float32)
    mask = np.array([[False, True]])
    target_mean, target_var = np.float32(0.1), np.float32(0.02)
    got = jax.jit(losses.attention_mean_var_loss)(mean, var, target_mean, target_var, mask)
    # Differences 0.2 and 0.03 of decimals rounded to fp32: a few U relative each, squared.
    assert_close(got, 0.2**2 + 0.03**2)


def test_rescale_to_norm():
    x = make_inputs()
    v, ref = x["learned"], x["ref_norm"]
    out = np.asarray(rescale(v, ref), np.float64)
    # Norm of a 5-vector scaled in fp32: a few U relative per entry, (D + 4) U = 5e-7 at most.
    assert_close(np.linalg.norm(out, axis=-1), ref)
    # Same direction: each entry is v_i * s * (1 + d_i) with |d_i| <= ~4 U, and 1 - cos of two
    # such vectors is O(d^2) ~ 1e-13; in float64 that is what the check sees (a wrong
    # per-entry scaling would be O(1e-2)).
    v64 = v.astype(np.float64)
    cos = np.sum(out * v64, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(v64, axis=-1))
    np.testing.assert_allclose(cos, 1.0, rtol=0, atol=1e-12)
    # scalar reference, bf16 input keeps its dtype
    out_bf16 = rescale(jnp.asarray(v, jnp.bfloat16), 2.0)
    assert out_bf16.dtype == jnp.bfloat16
    # Each output entry is rounded to bf16 (8 significant bits: 2^-8 = 3.9e-3 relative), so the
    # norm is off by <= 2^-8; 2^-7 leaves 2x.
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(out_bf16, np.float64), axis=-1), 2.0, rtol=2.0**-7
    )
    # zero vector: zero out, zero gradient
    zero = np.zeros((1, D), np.float32)
    assert np.all(np.asarray(rescale(zero, 3.0)) == 0)
    assert np.all(np.asarray(jax.grad(lambda z: rescale(z, 3.0).sum())(zero)) == 0)


# ---------------------------------------------------------------- properties


def test_zero_when_both_sides_equal():
    x = make_inputs()
    h, s, m = x["h_obj"], x["s_obj"], x["mask"]
    t_mean, t_var = x["t_mean"], x["t_var"]
    # Differences of equal numbers are exactly 0 in floating point: these losses are exactly 0.
    exact = {
        "diffusion": JIT["diffusion_min_snr_eps"](x["out"], x["out"], x["snr"]),
        "attention_mean_var": JIT["attention_mean_var"](
            np.broadcast_to(t_mean, s.shape), np.broadcast_to(t_var, s.shape), t_mean, t_var, m
        ),
    }
    # A vector's cosine with itself is 1 only to within the cosine bound (COS_ATOL above).
    cosine = {
        "pairwise": JIT["pairwise"](h, h, m),
        "hinge": hinge(x["learned"], x["learned"], 1.0),
        "semantic": JIT["semantic"](x["pooled_obj"], x["pooled_obj"]),
        "knowledge": JIT["knowledge"](h, h, m),
    }
    for variant in ("paper", "code"):
        cosine[f"embedding_{variant}"] = embedding(h, h, m, variant)
        exact[f"attention_{variant}"] = attention(s, s, m, variant)
    for name, value in exact.items():
        assert float(value) == 0.0, name
    for name, value in cosine.items():
        assert abs(float(value)) < COS_ATOL, name


def _garbage(a, keep, fill):
    return np.where(keep, a, np.asarray(fill, a.dtype))


@pytest.mark.parametrize("fill", [1e30, -3e4, 0.0, np.nan, np.inf])
@pytest.mark.parametrize(
    "name",
    [
        "embedding_paper",
        "embedding_code",
        "attention_paper",
        "attention_code",
        "pairwise",
        "knowledge",
        "attention_mean_var",
    ],
)
def test_masked_positions_have_no_effect(name, fill):
    args, n_diff = args_of(name, make_inputs(seed=5)), CASES[name][2]
    mask = args[-1]

    def keep(a):  # which entries of a [B, T, D] / [L, B, T] input are real; None: leave clean
        if a.shape[-2:] == (T, D):
            return np.broadcast_to(mask[..., None], a.shape)
        return np.broadcast_to(mask, a.shape) if a.shape[-1] == T else None

    keeps = [keep(a) for a in args[:n_diff]]
    dirty = [a if k is None else _garbage(a, k, fill) for a, k in zip(args, keeps, strict=False)]
    clean_val, clean_grads = VALUE_AND_GRAD[name](*args)
    val, grads = VALUE_AND_GRAD[name](*dirty, *args[n_diff:])
    # Masked entries are replaced by zeros before any arithmetic, so both calls run the same
    # compiled program on the same numbers: bitwise equal, values and gradients.
    np.testing.assert_array_equal(val, clean_val)
    for g, g_clean, k in zip(grads, clean_grads, keeps, strict=True):
        chex.assert_tree_all_finite(g)
        np.testing.assert_array_equal(g, g_clean)
        if k is not None:
            assert np.all(np.asarray(g)[~k] == 0.0)


@pytest.mark.parametrize(
    "name", ["embedding_paper", "embedding_code", "pairwise", "hinge", "semantic", "knowledge"]
)
def test_cosine_losses_invariant_to_positive_scaling(name):
    fn, args = JIT[name], args_of(name, make_inputs(seed=6))
    base = fn(*args)
    # Scaled inputs round differently (x 7.5 and x 0.02 are not powers of two); normalising
    # gives back the same unit vectors within a few U per entry: the cosine bound.
    assert_close(fn(args[0] * 7.5, *args[1:]), base, cosine=True)
    assert_close(fn(args[0], args[1] * 0.02, *args[2:]), base, cosine=True)


def test_embedding_variants_differ_where_they_should():
    x = make_inputs(seed=7)
    h, mask = x["h_obj"], x["mask"]
    # Per-token scaling keeps every feature-axis cosine at 1 but bends the token-axis columns.
    per_token = h * np.linspace(0.5, 3.0, T, dtype=np.float32)[None, :, None]
    assert abs(float(embedding(h, per_token, mask, "paper"))) < COS_ATOL  # cos = 1 to rounding
    assert float(embedding(h, per_token, mask, "code")) > 1e-2
    # Per-channel scaling does the opposite.
    per_channel = h * np.linspace(0.2, 5.0, D, dtype=np.float32)
    assert abs(float(embedding(h, per_channel, mask, "code"))) < COS_ATOL
    assert float(embedding(h, per_channel, mask, "paper")) > 1e-2


def test_attention_variants_differ_where_they_should():
    x = make_inputs(seed=8)
    s, mask = x["s_obj"], x["mask"]
    # Layer offsets that cancel in the layer mean: "paper" sees nothing, "code" does.
    offsets = np.array([0.1, -0.1, 0.05, -0.05], np.float32)[:, None, None]
    # The offsets cancel up to rounding: a layer mean of values <= 0.4 is off by ~4 U = 1e-7
    # absolute, and the loss squares that (~1e-14); 1e-12 leaves room, "code" sees 1e-3.
    assert float(attention(s + offsets, s, mask, "paper")) < 1e-12
    assert float(attention(s + offsets, s, mask, "code")) > 1e-3


def test_batch_reduction_semantics():
    x = make_inputs(seed=9)
    mask = x["mask"]
    # With one layer there is no Jensen gap: "code" is exactly B times "paper".
    s_obj, s_cat = x["s_obj"][:1], x["s_cat"][:1]
    paper = attention(s_obj, s_cat, mask, "paper")
    code = attention(s_obj, s_cat, mask, "code")
    # B * (sum / B) against sum: the two sums of the same terms may be ordered differently
    # (one is a mean over the batch), then one division and one product: RTOL covers it.
    assert_close(code, B * paper)
    # Repeating the batch: the code attention sum doubles, every batch mean stays put.
    tile = lambda a, axis: np.concatenate([a, a], axis=axis)  # noqa: E731
    mask2 = tile(mask, 0)
    s_obj2, s_cat2 = tile(x["s_obj"], 1), tile(x["s_cat"], 1)
    h_obj2, h_cat2 = tile(x["h_obj"], 0), tile(x["h_cat"], 0)
    # Sums over 2B examples instead of B: other summation order, same terms.
    for variant, factor in (("paper", 1), ("code", 2)):
        assert_close(
            attention(s_obj2, s_cat2, mask2, variant),
            factor * attention(x["s_obj"], x["s_cat"], mask, variant),
        )
        assert_close(
            embedding(h_obj2, h_cat2, mask2, variant),
            embedding(x["h_obj"], x["h_cat"], mask, variant),
            cosine=True,
        )


@pytest.mark.parametrize("name", ["embedding_paper", "embedding_code", "pairwise"])
def test_example_without_context_counts_as_zero(name):
    fn, (h_obj, h_cat, mask) = JIT[name], args_of(name, make_inputs(seed=10))
    empty = mask.copy()
    empty[1] = False
    alone = fn(h_obj[:1], h_cat[:1], mask[:1])
    both = fn(h_obj[:2], h_cat[:2], empty[:2])
    assert_close(both, alone / 2, cosine=True)


def test_bf16_inputs_give_float32_losses():
    x = make_inputs()
    h = jnp.asarray(x["h_obj"], jnp.bfloat16)
    out = embedding(h, h * 2, x["mask"], "code")
    assert out.dtype == jnp.float32
    assert diffusion(h, h + 1).dtype == jnp.float32


def test_bad_arguments_raise():
    x = make_inputs()
    with pytest.raises(ValueError, match="variant"):
        losses.core_embedding_loss(x["h_obj"], x["h_cat"], x["mask"], "torch")
    with pytest.raises(ValueError, match="variant"):
        losses.core_attention_loss(x["s_obj"], x["s_cat"], x["mask"], "mean")
    with pytest.raises(ValueError, match="prediction_type"):
        losses.diffusion_loss(x["out"], x["tgt"], prediction_type="flow")
    with pytest.raises(ValueError, match="snr"):
        losses.diffusion_loss(x["out"], x["tgt"], min_snr_gamma=5.0)


# ---------------------------------------------------------------- gradients, jit, vmap


@pytest.mark.parametrize("name", list(CASES))
def test_numerical_gradients(name):
    with jax.enable_x64(True):
        args, n_diff = args_of(name, make_inputs(seed=11, dtype=np.float64)), CASES[name][2]
        rest = args[n_diff:]
        check_grads(lambda *d: JIT[name](*d, *rest), args[:n_diff], order=1, modes=("rev",))


@pytest.mark.parametrize("name", list(CASES))
def test_jit_equals_eager(name):
    """The compiled loss against the same function run op by op (`disable_jit`: no tracing,
    no fusion), value and gradients."""
    fn, _, n_diff = CASES[name]
    args = args_of(name, make_inputs(seed=12))
    with jax.disable_jit():
        eager = fn(*args)
        eager_grads = jax.grad(lambda *d: jnp.sum(fn(*d, *args[n_diff:])),
                               argnums=tuple(range(n_diff)))(*args[:n_diff])
    if name == "rescale_to_norm":  # a vector output: the gradient of its sum
        compiled = JIT[name](*args)
        compiled_grads = jax.jit(jax.grad(lambda *d: jnp.sum(fn(*d, *args[n_diff:])),
                                          argnums=tuple(range(n_diff))))(*args[:n_diff])
    else:
        compiled, compiled_grads = VALUE_AND_GRAD[name](*args)
    # jit fuses the ops into one program: XLA may contract a multiply and an add into an FMA or
    # vectorise a reduction in another order. Each moves an intermediate by about one rounding,
    # which the case's own bound (RTOL or COS_ATOL, above) already counts.
    assert_close(compiled, eager, cosine=name in COSINE_CASES)
    for g, g_eager in zip(compiled_grads, eager_grads, strict=True):
        # Gradients: the same rounding bound, relative to each gradient's largest entry.
        assert_close(g, g_eager)


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_matches_per_slice(name):
    args0, args1 = args_of(name, make_inputs(seed=13)), args_of(name, make_inputs(seed=14))
    stacked = [np.stack([a0, a1]) for a0, a1 in zip(args0, args1, strict=True)]
    got = jax.jit(jax.vmap(CASES[name][0]))(*stacked)
    # vmap batches each reduction: XLA may order the sums differently than per slice.
    want = jnp.stack([JIT[name](*args0), JIT[name](*args1)])
    assert_close(got, want, cosine=name in COSINE_CASES)


def test_pairwise_with_concept_adds_the_concept_slot():
    """The thesis's form: the matrices also hold S* (y*) against the super-category (y_cat)."""
    with_concept = jax.jit(losses.pairwise_loss_with_concept)
    h_obj = np.array([[[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]]], np.float32)
    h_cat = np.array([[[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]]], np.float32)
    mask = np.array([[True, True, False]])
    concept = np.array([[1.0, 0.0]], np.float32)
    # Over (context 1, context 2, concept): S_obj = [[1, 0, 1], [0, 1, 0], [1, 0, 1]],
    # S_cat = [[1, s, 1], [s, 1, s], [1, s, 1]] with s = 1/sqrt2: |diff| sums to 4s over 9 pairs.
    assert_close(with_concept(h_obj, h_cat, mask, concept, concept), 4 * S2 / 9, cosine=True)
    x = make_inputs(seed=5)
    c_obj = np.random.default_rng(6).normal(size=(B, D)).astype(np.float32)
    c_cat = np.random.default_rng(7).normal(size=(B, D)).astype(np.float32)
    want = ref_pairwise(np.concatenate([x["h_obj"], c_obj[:, None]], 1).astype(np.float64),
                        np.concatenate([x["h_cat"], c_cat[:, None]], 1),
                        np.concatenate([x["mask"], np.ones((B, 1), bool)], 1))
    assert_close(with_concept(x["h_obj"], x["h_cat"], x["mask"], c_obj, c_cat), want,
                 cosine=True)
    # Zero when both prompts encode alike; the concept slot alone can make it non-zero.
    assert float(with_concept(x["h_obj"], x["h_obj"], x["mask"], c_obj, c_obj)) == 0.0
    assert float(with_concept(x["h_obj"], x["h_obj"], x["mask"], c_obj, c_cat)) > 1e-3
    check_grads(lambda h, c: losses.pairwise_loss_with_concept(h, x["h_cat"], x["mask"], c,
                                                               c_cat),
                (x["h_obj"].astype(np.float64), c_obj.astype(np.float64)), order=1,
                modes=["rev"], eps=1e-4, atol=1e-2, rtol=1e-2)

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
    chex.assert_trees_all_close(diffusion(x["out"], x["tgt"]), per_example.mean(), rtol=1e-6)


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
    chex.assert_trees_all_close(got, (5 * weights[0] + 4 * weights[1]) / 2, rtol=1e-6)
    # snr is ignored without gamma
    chex.assert_trees_all_close(
        diffusion(out, tgt, np.array([0.5, 10.0]), None, prediction_type), 4.5
    )


def test_min_snr_zero_terminal_snr_is_finite():
    out, tgt = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    snr = np.array([0.0, 20.0], np.float32)
    eps = diffusion(out, tgt, snr, 5.0, "epsilon")
    v = diffusion(out, tgt, snr, 5.0, "v_prediction")
    chex.assert_trees_all_close(eps, (1.0 + 0.25) / 2)  # weight -> 1 as snr -> 0
    chex.assert_trees_all_close(v, (0.0 + 5 / 21) / 2)
    grads = jax.grad(diffusion)(out, tgt, snr, 5.0)
    chex.assert_tree_all_finite(grads)


def test_embedding_loss_hand_values():
    # context: tokens 0 and 1; token 2 (S*) holds junk
    h_obj = np.array([[[1.0, 0.0], [0.0, 1.0], [9.0, -9.0]]], np.float32)
    h_cat = np.array([[[2.0, 0.0], [1.0, 1.0], [-5.0, 3.0]]], np.float32)
    mask = np.array([[True, True, False]])
    # paper: per-token cos over features = 1, 1/sqrt2
    chex.assert_trees_all_close(embedding(h_obj, h_cat, mask, "paper"), (1 - S2) / 2, rtol=1e-6)
    # code: channel 0 columns (1, 0) vs (2, 1): cos 2/sqrt5; channel 1 columns (0, 1) vs (0, 1): 1
    chex.assert_trees_all_close(
        embedding(h_obj, h_cat, mask, "code"), (1 - 2 / np.sqrt(5)) / 2, rtol=1e-6
    )


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_embedding_loss_matches_numpy(variant):
    x = make_inputs(seed=1)
    want = ref_embedding(x["h_obj"].astype(np.float64), x["h_cat"], x["mask"], variant)
    got = embedding(x["h_obj"], x["h_cat"], x["mask"], variant)
    chex.assert_trees_all_close(got, want, rtol=1e-5)


def test_attention_loss_hand_values():
    s_obj = np.array([[[0.1, 0.5, 0.3]], [[0.3, 0.9, 0.1]]], np.float32)  # [L=2, B=1, T=3]
    s_cat = np.array([[[0.2, 0.0, 0.2]], [[0.2, 0.0, 0.0]]], np.float32)
    mask = np.array([[True, False, True]])
    # paper: layer means obj (.2, ., .2), cat (.2, ., .1) -> ((0)^2 + (.1)^2) / 2
    chex.assert_trees_all_close(attention(s_obj, s_cat, mask, "paper"), 0.005, rtol=1e-5)
    # code: layer 0 diffs (-.1, .1), layer 1 (.1, .1) -> .01 each
    chex.assert_trees_all_close(attention(s_obj, s_cat, mask, "code"), 0.01, rtol=1e-5)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_attention_loss_matches_numpy(variant):
    x = make_inputs(seed=2)
    want = ref_attention(x["s_obj"].astype(np.float64), x["s_cat"], x["mask"], variant)
    got = attention(x["s_obj"], x["s_cat"], x["mask"], variant)
    chex.assert_trees_all_close(got, want, rtol=1e-5)


def test_pairwise_loss_hand_value_and_numpy():
    h_obj = np.array([[[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]]], np.float32)
    h_cat = np.array([[[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]]], np.float32)
    mask = np.array([[True, True, False]])
    # S_obj = [[1, 0], [0, 1]], S_cat = [[1, 1/sqrt2], [1/sqrt2, 1]]
    chex.assert_trees_all_close(pairwise(h_obj, h_cat, mask), 2 * S2 / 4, rtol=1e-6)
    x = make_inputs(seed=3)
    want = ref_pairwise(x["h_obj"].astype(np.float64), x["h_cat"], x["mask"])
    got = pairwise(x["h_obj"], x["h_cat"], x["mask"])
    chex.assert_trees_all_close(got, want, rtol=1e-5)


def test_hinge_loss_values_and_broadcasting():
    learned = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # [V=2, D=2]
    sup = np.array([1.0, 1.0], np.float32)  # cos 1/sqrt2 with both
    chex.assert_trees_all_close(hinge(learned, sup, 0.9), 0.9 - S2, rtol=1e-6)
    assert float(hinge(learned, sup, 0.5)) == 0.0  # above the margin
    # per-vector targets [V, D] and a leading concept axis [C, V, D]
    sup_v = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)  # cos 1 and 0
    chex.assert_trees_all_close(hinge(learned, sup_v, 0.5), 0.25, rtol=1e-6)
    chex.assert_trees_all_close(hinge(np.stack([learned, learned]), sup_v, 0.5), 0.25, rtol=1e-6)


def test_semantic_preservation_value():
    a = np.array([[1.0, 0.0], [2.0, 0.0]], np.float32)
    b = np.array([[1.0, 1.0], [3.0, 0.0]], np.float32)
    chex.assert_trees_all_close(JIT["semantic"](a, b), (1 - S2) / 2, rtol=1e-6)
    # a zero vector has cosine 0 with anything, and no gradient
    a[1] = 0.0
    value, grad = jax.value_and_grad(JIT["semantic"])(a, b)
    chex.assert_trees_all_close(value, (1 - S2 + 1) / 2, rtol=1e-6)
    assert np.all(np.asarray(grad[1]) == 0)


def test_knowledge_preservation_is_a_token_mean():
    x = make_inputs(seed=4)
    h, hf, mask = x["h_obj"], x["h_cat"], x["mask"]
    terms = [1 - np_cos(h[b, t], hf[b, t]) for b in range(B) for t in np.flatnonzero(mask[b])]
    chex.assert_trees_all_close(JIT["knowledge"](h, hf, mask), np.mean(terms), rtol=1e-5)


def test_attention_mean_var_value():
    mean = np.array([[[0.9, 0.3]]], np.float32)  # [L=1, B=1, T=2]; token 0 not a placeholder
    var = np.array([[[0.7, 0.05]]], np.float32)
    mask = np.array([[False, True]])
    target_mean, target_var = np.float32(0.1), np.float32(0.02)
    got = jax.jit(losses.attention_mean_var_loss)(mean, var, target_mean, target_var, mask)
    chex.assert_trees_all_close(got, 0.2**2 + 0.03**2, rtol=1e-5)


def test_rescale_to_norm():
    x = make_inputs()
    v, ref = x["learned"], x["ref_norm"]
    out = np.asarray(rescale(v, ref))
    chex.assert_trees_all_close(np.linalg.norm(out, axis=-1), ref, rtol=1e-5)
    cos = np.sum(out * v, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(v, axis=-1))
    chex.assert_trees_all_close(cos, np.ones_like(cos), rtol=1e-6)
    # scalar reference, bf16 input keeps its dtype
    out_bf16 = rescale(jnp.asarray(v, jnp.bfloat16), 2.0)
    assert out_bf16.dtype == jnp.bfloat16
    chex.assert_trees_all_close(
        jnp.linalg.norm(out_bf16.astype(jnp.float32), axis=-1), jnp.full((2, 3), 2.0), rtol=2e-2
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
    values = {
        "diffusion": JIT["diffusion_min_snr_eps"](x["out"], x["out"], x["snr"]),
        "pairwise": JIT["pairwise"](h, h, m),
        "hinge": hinge(x["learned"], x["learned"], 1.0),
        "semantic": JIT["semantic"](x["pooled_obj"], x["pooled_obj"]),
        "knowledge": JIT["knowledge"](h, h, m),
        "attention_mean_var": JIT["attention_mean_var"](
            np.broadcast_to(t_mean, s.shape), np.broadcast_to(t_var, s.shape), t_mean, t_var, m
        ),
    }
    for variant in ("paper", "code"):
        values[f"embedding_{variant}"] = embedding(h, h, m, variant)
        values[f"attention_{variant}"] = attention(s, s, m, variant)
    for name, value in values.items():
        assert abs(float(value)) < 1e-6, name


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
    chex.assert_trees_all_close(val, clean_val, rtol=1e-6)
    for g, g_clean, k in zip(grads, clean_grads, keeps, strict=True):
        chex.assert_tree_all_finite(g)
        chex.assert_trees_all_close(g, g_clean, rtol=1e-5, atol=1e-7)
        if k is not None:
            assert np.all(np.asarray(g)[~k] == 0.0)


@pytest.mark.parametrize(
    "name", ["embedding_paper", "embedding_code", "pairwise", "hinge", "semantic", "knowledge"]
)
def test_cosine_losses_invariant_to_positive_scaling(name):
    fn, args = JIT[name], args_of(name, make_inputs(seed=6))
    base = fn(*args)
    chex.assert_trees_all_close(fn(args[0] * 7.5, *args[1:]), base, rtol=1e-5)
    chex.assert_trees_all_close(fn(args[0], args[1] * 0.02, *args[2:]), base, rtol=1e-5)


def test_embedding_variants_differ_where_they_should():
    x = make_inputs(seed=7)
    h, mask = x["h_obj"], x["mask"]
    # Per-token scaling keeps every feature-axis cosine at 1 but bends the token-axis columns.
    per_token = h * np.linspace(0.5, 3.0, T, dtype=np.float32)[None, :, None]
    assert float(embedding(h, per_token, mask, "paper")) < 1e-6
    assert float(embedding(h, per_token, mask, "code")) > 1e-2
    # Per-channel scaling does the opposite.
    per_channel = h * np.linspace(0.2, 5.0, D, dtype=np.float32)
    assert float(embedding(h, per_channel, mask, "code")) < 1e-6
    assert float(embedding(h, per_channel, mask, "paper")) > 1e-2


def test_attention_variants_differ_where_they_should():
    x = make_inputs(seed=8)
    s, mask = x["s_obj"], x["mask"]
    # Layer offsets that cancel in the layer mean: "paper" sees nothing, "code" does.
    offsets = np.array([0.1, -0.1, 0.05, -0.05], np.float32)[:, None, None]
    assert float(attention(s + offsets, s, mask, "paper")) < 1e-12
    assert float(attention(s + offsets, s, mask, "code")) > 1e-3


def test_batch_reduction_semantics():
    x = make_inputs(seed=9)
    mask = x["mask"]
    # With one layer there is no Jensen gap: "code" is exactly B times "paper".
    s_obj, s_cat = x["s_obj"][:1], x["s_cat"][:1]
    paper = attention(s_obj, s_cat, mask, "paper")
    code = attention(s_obj, s_cat, mask, "code")
    chex.assert_trees_all_close(code, B * paper, rtol=1e-6)
    # Repeating the batch: the code attention sum doubles, every batch mean stays put.
    tile = lambda a, axis: np.concatenate([a, a], axis=axis)  # noqa: E731
    mask2 = tile(mask, 0)
    s_obj2, s_cat2 = tile(x["s_obj"], 1), tile(x["s_cat"], 1)
    h_obj2, h_cat2 = tile(x["h_obj"], 0), tile(x["h_cat"], 0)
    for variant, factor in (("paper", 1), ("code", 2)):
        chex.assert_trees_all_close(
            attention(s_obj2, s_cat2, mask2, variant),
            factor * attention(x["s_obj"], x["s_cat"], mask, variant),
            rtol=1e-6,
        )
        chex.assert_trees_all_close(
            embedding(h_obj2, h_cat2, mask2, variant),
            embedding(x["h_obj"], x["h_cat"], mask, variant),
            rtol=1e-6,
        )


@pytest.mark.parametrize("name", ["embedding_paper", "embedding_code", "pairwise"])
def test_example_without_context_counts_as_zero(name):
    fn, (h_obj, h_cat, mask) = JIT[name], args_of(name, make_inputs(seed=10))
    empty = mask.copy()
    empty[1] = False
    alone = fn(h_obj[:1], h_cat[:1], mask[:1])
    both = fn(h_obj[:2], h_cat[:2], empty[:2])
    chex.assert_trees_all_close(both, alone / 2, rtol=1e-6)


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


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_same_values_with_and_without_jit(self):
        x = make_inputs(seed=12)
        for name, (fn, _, _) in CASES.items():
            args = args_of(name, x)
            want = JIT[name](*args)
            got = self.variant(fn)(*args)
            chex.assert_trees_all_close(got, want, rtol=1e-6, custom_message=name)


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_matches_per_slice(name):
    args0, args1 = args_of(name, make_inputs(seed=13)), args_of(name, make_inputs(seed=14))
    stacked = [np.stack([a0, a1]) for a0, a1 in zip(args0, args1, strict=True)]
    got = jax.jit(jax.vmap(CASES[name][0]))(*stacked)
    chex.assert_trees_all_close(got, jnp.stack([JIT[name](*args0), JIT[name](*args1)]), rtol=1e-6)

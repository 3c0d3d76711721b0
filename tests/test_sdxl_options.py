"""SDXL's training options: add-time ids from each view's crop, L_emb on either or both text
encoders (`emb_encoders`), the cross-attention layers L_attn averages (`attn_layers`)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from core_jax import data as image_data
from core_jax import losses
from core_jax.config import STAGE1_METHODS, base_config, migrate, stage_config
from core_jax.errors import InputError
from core_jax.methods.core import attention_layer_indices
from core_jax.text import add_placeholder_tokens, caption_ids, load_templates, placeholder_string
from core_jax.train import setup as run_setup
from core_jax.train.concepts import ConceptSpec
from core_jax.train.passes import Passes, closure, cross_attention_layers, draw_batch
from core_jax.train.stages import build_program, stage_numbers

RES = 64  # tiny_sdxl's pixel size


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- 1. Add-time ids from each view's crop ----------------------------------------------------


def _resized(photo: np.ndarray, resolution: int, flip: bool) -> np.ndarray:
    """The photo as the augmentation resizes it without rotation: shorter side `resolution`."""
    img = Image.fromarray(photo)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img, np.float32) / 127.5 - 1.0


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_each_view_records_the_crop_it_was_cut_from(flip_p):
    """Without rotation, a view is the resized (flipped) photo at its recorded crop top-left;
    original size is the photo's as given (also when it is shrunk first), target the view's."""
    photos = [_noise(48, 80), _noise(96, 40, seed=1), _noise(200, 300, seed=2)]
    views, ids = image_data.augmented_views_with_time_ids(photos, 9, 32, seed=3, rotate_p=0.0,
                                                          flip_p=flip_p)
    np.testing.assert_array_equal(views, image_data.augmented_views(
        photos, 9, 32, seed=3, rotate_p=0.0, flip_p=flip_p))
    assert ids.shape == (9, 6) and ids.dtype == np.int32
    moved = set()
    for view, row, k in zip(views, ids, range(9), strict=True):
        photo = photos[k % 3]
        assert tuple(row[:2]) == photo.shape[:2] and tuple(row[4:]) == (32, 32)
        top, left = row[2:4]
        moved.add((top, left))
        if k % 3 < 2:  # the third is shrunk to 2x first: same crop, other resampling
            want = _resized(photo, 32, flip_p == 1.0)[top:top + 32, left:left + 32]
            np.testing.assert_array_equal(view, want)
    assert len(moved) > 3  # the crops differ from view to view


def test_uncropped_squares_give_the_fixed_ids_used_before():
    """Square photos at the resolution, not rotated: every view is the whole photo, and its
    ids are the (R, R, 0, 0, R, R) every row used before the ids came from the views."""
    photos = [_noise(RES, RES), _noise(RES, RES, seed=1)]
    _, ids = image_data.augmented_views_with_time_ids(photos, 6, RES, seed=0, rotate_p=0.0)
    np.testing.assert_array_equal(ids, np.tile([RES, RES, 0, 0, RES, RES], (6, 1)))


def test_zoom_views_record_their_crops():
    """Custom Diffusion's zoom: a zoomed-in view is the squashed photo at its crop top-left;
    a zoomed-out one cuts nothing off, (0, 0)."""
    photo = _noise(40, 30)
    views, masks, ids = image_data.zoom_views_with_time_ids([photo], 30, 32, 8, seed=0,
                                                            flip_p=0.0)
    plain = image_data.zoom_views([photo], 30, 32, 8, seed=0, flip_p=0.0)
    np.testing.assert_array_equal(plain[0], views)
    np.testing.assert_array_equal(plain[1], masks)
    assert (ids[:, :2] == (40, 30)).all() and (ids[:, 4:] == 32).all()
    zoomed_in = 0
    for view, mask, row in zip(views, masks, ids, strict=True):
        top, left = row[2:4]
        if not mask.all():
            assert (top, left) == (0, 0)
            continue
        zoomed_in += 1
        # The side s is not recorded: the view must be the crop at (top, left) of one of them.
        crops = []
        for side in range(int(1.2 * 32), int(1.4 * 32)):
            squashed = Image.fromarray(photo).resize((side, side), Image.Resampling.BILINEAR)
            pixels = np.asarray(squashed, np.float32) / 127.5 - 1.0
            crops.append(pixels[top:top + 32, left:left + 32])
        assert any(c.shape == view.shape and np.array_equal(c, view) for c in crops)
    assert zoomed_in


@pytest.fixture(scope="module")
def xl():
    """A tiny_sdxl run's pieces as `core-jax train` makes them: models, a pool of views of
    non-square photos (encoded by the VAE), the concept data and the step's models."""
    config = base_config()
    config.model.preset = "tiny_sdxl"
    config.data.resolution = RES
    config.data.num_views = 4
    models = run_setup.load_models(config)
    tokenizer = copy.deepcopy(models.tokenizer)
    placeholder_ids = add_placeholder_tokens(tokenizer, "<s*>", 1)
    text = placeholder_string("<s*>", 1)
    photos = [_noise(48, 80), _noise(96, 72, seed=1)]
    pool = run_setup.latent_pool(config, models, photos)
    spec = ConceptSpec("c", "cat", tuple(load_templates("animate")[:3]))
    data = run_setup.concept_data(models, tokenizer, text, [spec], [pool])
    step_models = run_setup.step_models(models, tokenizer, placeholder_ids,
                                        caption_ids(tokenizer, text))
    frozen = {**models.frozen_text, "unet": models.params["unet"]}
    # S* [C, V, D1 + D2] away from the super-category, so y* and y_cat differ.
    noise = jax.random.normal(jax.random.key(1), data.super_embed.shape)
    params = {"embeds": (data.super_embed + 2 * jnp.std(data.super_embed) * noise)[:, None]}
    return dict(config=config, models=models, photos=photos, pool=pool, data=data,
                step_models=step_models, frozen=frozen, params=params)


ALL_PASSES = closure({"caption_pred", "obj_stats", "cat_stats", "obj_aligned", "cat_aligned",
                      "context_mask", "data_shards"})


@pytest.fixture(scope="module")
def xl_passes(xl):
    """One step's batch (6 rows) and every shared computation the options read, jitted once;
    `run(data)` recomputes them for other concept data of the same shapes."""
    schedule = xl["models"].schedule
    rng, step = jnp.zeros((1, 2), jnp.uint32), jnp.zeros((1,), jnp.int32)

    @jax.jit
    def run(data):
        batch = draw_batch(rng, step, data, schedule, jnp.arange(6))
        p = Passes(xl["params"], xl["frozen"], batch, data, schedule, xl["step_models"],
                   ALL_PASSES, 1)
        values = {name: p[name] for name in sorted(ALL_PASSES)}
        return batch, values, p._values["caption_pooled"], p.x_t

    return run


def test_the_pool_carries_each_views_ids_into_the_concept_data(xl):
    want = image_data.augmented_views_with_time_ids(xl["photos"], 4, RES, xl["config"].seed)[1]
    np.testing.assert_array_equal(xl["pool"].time_ids, want)
    np.testing.assert_array_equal(xl["data"].time_ids[0], want.astype(np.float32))
    assert len({tuple(r) for r in want}) > 1  # views of different crops and photos


def test_each_row_takes_its_views_ids_into_the_unet(xl, xl_passes):
    """A row's add-time ids are those of the view it drew, and the U-Net's prediction for it
    is the one with those ids; with the ids of uncropped squares it is the prediction with the
    fixed ids every row used before."""
    data = xl["data"].replace(latent_std=jnp.zeros_like(xl["data"].latent_std))
    batch, values, pooled, x_t = xl_passes(data)
    means = np.asarray(data.latent_mean[0])
    for row in range(6):  # with std 0 the row's latent is its view's mean
        view = [v for v in range(4) if np.array_equal(means[v], np.asarray(batch.x0[row]))]
        assert len(view) == 1
        np.testing.assert_array_equal(batch.time_ids[row], data.time_ids[0, view[0]])
    assert len({tuple(np.asarray(r)) for r in batch.time_ids}) > 1

    unet = xl["models"].unet

    @jax.jit
    def direct(time_ids):
        context = jnp.broadcast_to(values["caption_hidden"][0], (6,) + values[
            "caption_hidden"].shape[1:])
        return unet.apply({"params": xl["frozen"]["unet"]}, x_t, batch.timesteps, context,
                          text_embeds=jnp.broadcast_to(pooled[0], (6, pooled.shape[-1])),
                          time_ids=time_ids)

    chex.assert_trees_all_close(values["caption_pred"][0], direct(batch.time_ids), atol=1e-5)
    assert not np.allclose(values["caption_pred"][0], direct(batch.time_ids[::-1]), atol=1e-5)

    fixed = jnp.asarray([RES, RES, 0, 0, RES, RES], jnp.float32)
    uncropped = data.replace(time_ids=jnp.broadcast_to(fixed, data.time_ids.shape))
    _, values_fixed, _, _ = xl_passes(uncropped)
    chex.assert_trees_all_close(values_fixed["caption_pred"][0],
                                direct(jnp.broadcast_to(fixed, (6, 6))), atol=1e-5)


def test_sdxl_concept_data_refuses_pools_without_ids(xl):
    models = xl["models"]
    tokenizer = copy.deepcopy(models.tokenizer)
    add_placeholder_tokens(tokenizer, "<s*>", 1)
    pool = xl["pool"]
    with pytest.raises(ValueError, match="add-time ids"):
        run_setup.concept_data(models, tokenizer, "<s*>", [ConceptSpec("c", "cat", ("a {}",))],
                               [(pool.mean, pool.std)])


# --- 2. L_emb on either or both encoders -----------------------------------------------------


def _np_cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _np_emb(h_obj, h_cat, mask, variant):
    """L_emb written with loops: per example the mean over context tokens of 1 - cos over
    features ("paper") or the mean over features of 1 - cos over context tokens ("code")."""
    per_example = []
    for b in range(h_obj.shape[0]):
        ctx = np.flatnonzero(mask[b])
        if variant == "paper":
            terms = [1 - _np_cos(h_obj[b, t], h_cat[b, t]) for t in ctx]
        else:
            terms = [1 - _np_cos(h_obj[b, ctx, d], h_cat[b, ctx, d])
                     for d in range(h_obj.shape[-1])]
        per_example.append(np.mean(terms))
    return np.mean(per_example)


def _np_encoders_emb(h_obj, h_cat, mask, widths, encoders, variant):
    cut = widths[0]
    first = _np_emb(h_obj[..., :cut], h_cat[..., :cut], mask, variant)
    second = _np_emb(h_obj[..., cut:], h_cat[..., cut:], mask, variant)
    return {"joined": _np_emb(h_obj, h_cat, mask, variant), "mean": (first + second) / 2,
            "clip_l": first, "clip_g": second}[encoders]


@pytest.mark.parametrize("variant", ["paper", "code"])
@pytest.mark.parametrize("encoders", losses.EMB_ENCODERS)
def test_emb_encoders_equal_a_numpy_writing(encoders, variant):
    rng = np.random.default_rng(0)
    widths = (3, 5)
    h_obj, h_cat = (rng.normal(size=(2, 6, 8)).astype(np.float32) for _ in range(2))
    mask = rng.random((2, 6)) < 0.6
    mask[:, 0] = True
    got = losses.encoders_embedding_loss(h_obj, h_cat, mask, widths, encoders, variant)
    want = _np_encoders_emb(h_obj.astype(np.float64), h_cat, mask, widths, encoders, variant)
    chex.assert_trees_all_close(got, jnp.float32(want), atol=2e-6)
    if encoders != "joined":  # the choice changes the value
        joined = _np_encoders_emb(h_obj.astype(np.float64), h_cat, mask, widths, "joined",
                                  variant)
        assert abs(want - joined) > 1e-3


def test_emb_encoders_bad_arguments():
    h = np.ones((1, 2, 8), np.float32)
    mask = np.ones((1, 2), bool)
    with pytest.raises(ValueError, match="add up"):
        losses.encoders_embedding_loss(h, h, mask, (3, 4), "mean")
    with pytest.raises(ValueError, match="two text encoders"):
        losses.encoders_embedding_loss(h, h, mask, (8,), "clip_g")
    with pytest.raises(ValueError, match="encoders must be"):
        losses.encoders_embedding_loss(h, h, mask, (3, 5), "both")
    one = losses.encoders_embedding_loss(h * np.arange(8), h, mask, (8,), "mean")
    chex.assert_trees_all_close(one, losses.core_embedding_loss(h * np.arange(8), h, mask))


def test_an_unknown_encoder_choice_is_one_line():
    from core_jax.train.stages import check_stage

    with pytest.raises(InputError, match=r"^stage1.emb_encoders is 'both'; choose one of "
                                         r"joined, mean, clip_l, clip_g$"):
        check_stage("stage1", stage_config(STAGE1_METHODS, emb_encoders="both"))


def _term(program, name):
    return next(t for t in program.terms if t.name == name)


def _term_value(program, name, values, stage):
    term = _term(program, name)
    return jax.vmap(term.fn)(*(values[n] for n in term.inputs), stage_numbers([stage]))[0]


@pytest.mark.parametrize("encoders", losses.EMB_ENCODERS)
def test_the_emb_term_reads_the_chosen_encoders(xl, xl_passes, encoders):
    """On tiny_sdxl (encoder widths 32 + 48) the step's L_emb is the loss of the chosen part
    of the context-aligned encodings."""
    assert xl["step_models"].encoder_widths == (32, 48)
    _, values, _, _ = xl_passes(xl["data"])
    stage = stage_config(STAGE1_METHODS, emb_encoders=encoders)
    program = build_program([stage], xl["step_models"], "epsilon")
    obj, cat, mask = (np.asarray(values[n][0], np.float64)
                      for n in ("obj_aligned", "cat_aligned", "context_mask"))
    want = _np_encoders_emb(obj[None], cat[None], mask[None].astype(bool), (32, 48), encoders,
                            "paper")
    chex.assert_trees_all_close(_term_value(program, "emb", values, stage), jnp.float32(want),
                                atol=2e-6)


def test_encoder_choices_on_one_encoder():
    """SD 1.x/2.x: "mean" is "joined"; clip_l / clip_g are refused in one line."""
    from core_jax.methods.base import Settings
    from core_jax.methods.core import METHOD

    for encoders in ("clip_l", "clip_g"):
        stage = dict(METHOD.defaults, emb_encoders=encoders)
        with pytest.raises(InputError, match="two text encoders"):
            METHOD.terms(Settings(stage, encoder_widths=(768,)))


# --- 3. The cross-attention layers L_attn averages --------------------------------------------


def test_attention_layers_are_the_unets_in_stats_order():
    from core_jax.models.presets import get_preset
    from core_jax.models.unet import UNet2DConditionModel

    sdxl = cross_attention_layers(UNet2DConditionModel(get_preset("sdxl").unet))
    assert len(sdxl) == 70  # SDXL base
    assert sdxl[0] == "down_blocks_1/attentions_0/transformer_blocks_0"
    assert sdxl[-1] == "up_blocks_1/attentions_2/transformer_blocks_1"
    sd15 = cross_attention_layers(UNet2DConditionModel(get_preset("sd15").unet))
    assert len(sd15) == 16 and sum(p.startswith("mid_block") for p in sd15) == 1


LAYERS = ("down_blocks_0/attentions_0/transformer_blocks_0",
          "down_blocks_0/attentions_1/transformer_blocks_0",
          "down_blocks_1/attentions_0/transformer_blocks_0",
          "mid_block/attentions_0/transformer_blocks_0",
          "up_blocks_0/attentions_0/transformer_blocks_0",
          "up_blocks_0/attentions_0/transformer_blocks_1")


@pytest.mark.parametrize("selection, want", [
    ("down", (0, 1, 2)), ("mid", (3,)), ("up", (4, 5)), ("mid, up", (3, 4, 5)),
    ("5,0,5", (0, 5)), ("down_blocks_0", (0, 1)), ("up_blocks_0/attentions_0", (4, 5)),
    ("mid_block/attentions_0/transformer_blocks_0,1", (1, 3)),
])
def test_attention_layer_selection(selection, want):
    assert attention_layer_indices(selection, LAYERS) == want


@pytest.mark.parametrize("selection, match", [
    ("", "names no layer"), (" , ", "names no layer"), ("6", "'6' names none"),
    ("middle", "'middle' names none"), ("down_blocks_0/attentions", "names none"),
])
def test_bad_attention_layer_selections_are_one_line_errors(selection, match):
    with pytest.raises(InputError, match=match) as err:
        attention_layer_indices(selection, LAYERS)
    assert "\n" not in str(err.value)


def _np_attn(obj, cat, mask):
    """L_attn ("paper") written with loops: per row the mean over context tokens of the
    squared difference of the layer means; mean over rows."""
    rows = []
    for b in range(obj.shape[1]):
        ctx = np.flatnonzero(mask)
        rows.append(np.mean((obj[:, b, ctx].mean(0) - cat[:, b, ctx].mean(0)) ** 2))
    return np.mean(rows)


def test_the_attn_term_averages_the_chosen_layers(xl, xl_passes):
    """"all" is L_attn over every layer (as before the key); "mid", "up" and numbers are the
    hand average over just those layers; bad selections stop the program's build in one
    line."""
    _, values, _, _ = xl_passes(xl["data"])
    layers = xl["step_models"].attention_layers()
    assert len(layers) == 17
    obj, cat = (np.asarray(values[n][0], np.float64) for n in ("obj_stats", "cat_stats"))
    mask = np.asarray(values["context_mask"][0], bool)
    assert obj.shape[0] == 17

    def term(selection):
        stage = stage_config(STAGE1_METHODS, attn_layers=selection)
        program = build_program([stage], xl["step_models"], "epsilon")
        return _term_value(program, "attn", values, stage)

    every = term("all")
    today = losses.core_attention_loss(values["obj_stats"][0], values["cat_stats"][0],
                                       jnp.broadcast_to(values["context_mask"][0],
                                                        values["obj_stats"].shape[2:]))
    chex.assert_trees_all_close(every, today)
    chex.assert_trees_all_close(every, jnp.float32(_np_attn(obj, cat, mask)), rtol=1e-5)
    chex.assert_trees_all_close(term(",".join(map(str, range(17)))), every, rtol=1e-6)
    for selection in ("mid", "up", "0,5,16"):
        chosen = list(attention_layer_indices(selection, layers))
        want = _np_attn(obj[chosen], cat[chosen], mask)
        got = term(selection)
        chex.assert_trees_all_close(got, jnp.float32(want), rtol=1e-5)
        assert abs(float(got) - float(every)) > 1e-6 * float(every)
    for bad in ("", "sideways"):
        with pytest.raises(InputError):
            term(bad)


def test_a_choice_the_model_cannot_meet_fails_before_the_run_writes(xl):
    """`core-jax train` builds each stage against the loaded model before it writes its
    workdir: a bad attn_layers stops there."""
    config = copy.deepcopy(xl["config"])
    run_setup.check_stages_on_model(config, xl["models"])
    config.stage1.attn_layers = "mid,sideways"
    with pytest.raises(InputError, match="'sideways' names none of the U-Net's 17"):
        run_setup.check_stages_on_model(config, xl["models"])


# --- 4. The keys in configs ---------------------------------------------------------------------


def test_new_keys_default_to_the_previous_behaviour_and_migrate():
    config = base_config()
    assert config.stage1.emb_encoders == "joined" and config.stage1.attn_layers == "all"
    saved = config.to_dict()
    del saved["stage1"]["emb_encoders"], saved["stage1"]["attn_layers"]
    migrated = migrate(saved)
    assert migrated["stage1"]["emb_encoders"] == "joined"
    assert migrated["stage1"]["attn_layers"] == "all"
    path = Path(__file__).resolve().parents[1] / "configs" / "core_sdxl.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    xl = module.get_config()
    assert xl.stage1.emb_encoders == "joined" and xl.stage1.attn_layers == "all"

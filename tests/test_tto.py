"""CoRe's test-time optimization (core_jax.tto, `core-jax sample --tto`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from core_jax import export
from core_jax.bench import build_setup
from core_jax.bench.programs import step_flops, variant_setup
from core_jax.config import base_config
from core_jax.errors import InputError
from core_jax.text import super_category_ids
from core_jax.train import setup as run_setup
from core_jax.train.outputs import sample_run
from core_jax.tto import CoreTTO, prompt_template, tto_stage


def micro_config():
    c = base_config()
    c.model.preset = "micro"
    c.concept.images = "builtin:chelsea"
    c.concept.super_category = "cat"
    c.data.resolution = 16
    c.data.num_views = 2
    c.stage1.batch_size = 2
    c.sample.steps = 2
    return c


@pytest.fixture(scope="module")
def trained():
    """A micro run's models and "trained" vectors: the super-category's embedding moved off it,
    so the regularizers are not at their zero."""
    config = micro_config()
    models = run_setup.load_models(config)
    table = np.asarray(
        models.params["text"]["text_model"]["embeddings"]["token_embedding"]["embedding"])
    start = table[super_category_ids(models.tokenizer, "cat")[:1]]
    noise = np.random.default_rng(0).normal(size=start.shape).astype(np.float32)
    return config, models, start + 0.5 * np.linalg.norm(start) * noise / np.linalg.norm(noise)


def test_prompt_template_names_the_word_once():
    assert prompt_template("a S* in the jungle", "<s*>") == "a {} in the jungle"
    assert prompt_template("a <s*> in the snow", "<s*>") == "a {} in the snow"
    assert prompt_template("a {}, watercolor", "<s*>") == "a {}, watercolor"
    for bad in ("a dog in the jungle", "a S* and a S*"):
        with pytest.raises(InputError, match="exactly once"):
            prompt_template(bad, "<s*>")


def test_stage_is_the_regularizers_at_the_papers_numbers():
    stage = tto_stage(base_config(), steps=10, learning_rate=5e-4)
    assert tuple(stage.methods) == ("test_time", "core")
    assert (stage.steps, stage.learning_rate, stage.rescale_end) == (10, 5e-4, 0)
    assert (stage.lambda_emb, stage.lambda_attn) == (1.5e-4, 0.05)
    with pytest.raises(InputError, match="steps"):
        tto_stage(base_config(), steps=0, learning_rate=5e-4)
    ti = base_config()
    ti.stage1.lambda_emb = ti.stage1.lambda_attn = 0.0
    with pytest.raises(InputError, match="lambda_emb or lambda_attn"):
        tto_stage(ti, steps=10, learning_rate=5e-4)


def test_adapts_the_vectors_without_the_diffusion_loss_and_compiles_once(trained):
    config, models, learned = trained
    optimizer = CoreTTO(config, models, learned, steps=10, learning_rate=5e-3)
    assert {t.name for t in optimizer.program.terms} == {"emb", "attn"}
    assert "caption_pred" not in optimizer.program.needs
    first = optimizer.adapt("a S* in the jungle")
    assert first.vectors.shape == learned.shape
    assert not np.allclose(first.vectors, learned)
    assert first.first["emb"] > 0 and first.first["attn"] >= 0
    assert first.last["emb"] < first.first["emb"]  # the regularizer pulls toward the context
    second = optimizer.adapt("a S* in the snow, sketch style")  # another prompt, same length
    assert not np.allclose(second.vectors, first.vectors)
    assert optimizer.compilations() == 1


def test_flops_are_cores_step_less_the_caption_pass():
    """TTO = the y* pass (forward and backward) and the y_cat pass (forward); CoRe's stage 1
    adds the caption pass for the diffusion loss, which TI is alone."""
    setup = build_setup("micro", batch=2)
    tto, core, ti = (step_flops(variant_setup(setup, v)) for v in ("tto", "core", "ti"))
    assert 0.8 < (core - tto) / ti < 1.25  # measured 1.10 on micro: shared encoder calls differ


def test_sample_with_tto_saves_the_vectors_and_draws_both_rows(trained, tmp_path):
    config, models, learned = trained
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    export.save_learned_embeds(tmp_path / "learned_embeds.safetensors", "<s*>", learned)
    lines = []
    grid = sample_run(tmp_path, ["a S* in the jungle"], num_images=1, steps=None, sampler=None,
                      guidance_scale=None, seed=0, out=tmp_path / "grid.png", tto_steps=3,
                      say=lines.append)
    saved = load_file(tmp_path / "tto" / "a_S__in_the_jungle.safetensors")["<s*>"]
    assert saved.shape == learned.shape and not np.allclose(saved, learned)
    assert "emb" in lines[0] and "->" in lines[0]
    with Image.open(grid) as image:
        side = config.data.resolution
        assert image.size[1] >= 2 * side  # a row with the trained vectors, one with the adapted

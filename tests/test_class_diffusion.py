"""ClassDiffusion (`class_diffusion`): the semantic preservation loss on the pooled text
features of "a photo of a S* <cls>" and "a photo of a <cls>", with the paper's (end-of-text)
and the code's (argmax of the ids: the S* position) pooling; the term read from the step equals
a numpy writing on our encoder's outputs; it trains S* and only through the S* phrase; packed
runs equal each alone; `core-jax train` with configs/class_diffusion_tiny.py end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import packing
import pytest
from jax.test_util import check_grads

from core_jax.errors import InputError
from core_jax.methods.base import Settings
from core_jax.methods.class_diffusion import METHOD, pooled_positions
from core_jax.text import add_placeholder_tokens, encode_with_learned, load_tokenizer, tokenize
from core_jax.train.concepts import SEMANTIC_PHRASES

ROOT = Path(__file__).resolve().parents[1]


def _setup(methods=("textual_inversion", "class_diffusion"), **stage):
    from core_jax.train.synthetic import random_setup

    return random_setup(preset="micro", num_concepts=2,
                        batch_size=2, methods=methods, **stage)


def test_pooled_positions_paper_at_end_of_text_code_at_the_placeholder():
    tokenizer = load_tokenizer()
    [placeholder] = add_placeholder_tokens(tokenizer, "<s*>", 1)
    ids = tokenize(tokenizer, ["a photo of a <s*> dog", "a photo of a dog"])
    eos = tokenizer.eos_token_id
    # "a photo of a" = 4 tokens after start-of-text: S* at 5, dog at 6, end-of-text at 7
    assert ids[0, 5] == placeholder and ids[0, 7] == eos and ids[1, 6] == eos
    np.testing.assert_array_equal(pooled_positions(jnp.asarray(ids), "paper", eos), [7, 6])
    np.testing.assert_array_equal(pooled_positions(jnp.asarray(ids), "code", eos), [5, 6])


def _numpy_spl(setup, params, pool: str) -> np.ndarray:
    """1 - cos of the pooled features, per concept, from our encoder called directly."""
    tokenizer = load_tokenizer()
    placeholder_ids = add_placeholder_tokens(tokenizer, "<s*>", 1)
    from core_jax.text import placeholder_slots

    out = []
    for c, category in enumerate(["cat", "dog"][: len(params["embeds"])]):
        ids = tokenize(tokenizer, [p.replace("{}", "<s*>").replace("{cls}", category)
                                   for p in SEMANTIC_PHRASES])
        hidden = np.asarray(encode_with_learned(
            setup.text_encoder, setup.frozen["text"], jnp.asarray(ids),
            jnp.asarray(params["embeds"][c]), placeholder_slots(ids, placeholder_ids)),
            np.float64)
        at = [list(row).index(tokenizer.eos_token_id) if pool == "paper" else int(np.argmax(row))
              for row in ids]
        a, b = hidden[0, at[0]], hidden[1, at[1]]
        out.append(1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    return np.asarray(out)


@pytest.mark.parametrize("pool", ["paper", "code"])
def test_the_steps_term_equals_a_numpy_writing(pool):
    setup = _setup(spl_pool=pool)
    assert setup.data.phrase_ids.shape == (2, 2, 77)
    assert "spl" in {term.name for term in setup.program.terms}
    before = jax.device_get(setup.state.params)
    _, history = packing.run_steps(setup, packing.one_device_step(setup), 1)
    np.testing.assert_allclose(history[0]["spl"], _numpy_spl(setup, before, pool),
                               rtol=1e-4, atol=1e-6)
    assert np.all(history[0]["spl"] > 0)
    np.testing.assert_allclose(history[0]["loss"], history[0]["diffusion"] + history[0]["spl"],
                               rtol=1e-5)


def test_the_term_trains_s_star_and_a_zero_weight_takes_it_out():
    """Two runs: lambda_spl 1 and 0. Run 1's update equals a pure-TI run's exactly (the term
    is out of its update); run 0's differs; the term's gradient reaches S* only through the
    phrase with S* (the class phrase is a constant)."""
    per_run = [{"lambda_spl": 1.0}, {"lambda_spl": 0.0}]
    setup = _setup(per_run=per_run)
    ti = _setup(methods=("textual_inversion",))
    state, _ = packing.run_steps(setup, packing.one_device_step(setup), 2)
    plain, _ = packing.run_steps(ti, packing.one_device_step(ti), 2)
    np.testing.assert_array_equal(state.params["embeds"][1], plain.params["embeds"][1])
    assert np.abs(state.params["embeds"][0] - plain.params["embeds"][0]).max() > 1e-6


def test_the_term_fn_has_checked_gradients_and_vmaps():
    settings = Settings({"spl_pool": "paper"})
    [term] = METHOD.terms(settings)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32)
    ids = jnp.asarray([[49406, 5, 49408, 7, 49407, 49407, 49407, 49407],
                       [49406, 5, 7, 49407, 49407, 49407, 49407, 49407]])
    fn = lambda h: term.fn(h, ids, {})  # noqa: E731
    a, b = np.asarray(hidden[0, 4], np.float64), np.asarray(hidden[1, 3], np.float64)
    np.testing.assert_allclose(fn(hidden), 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                               rtol=1e-5)
    same = hidden.at[0, 4].set(hidden[1, 3])
    np.testing.assert_allclose(fn(same), 0.0, atol=1e-6)
    check_grads(fn, (hidden,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    batched = jax.jit(jax.vmap(fn))(jnp.stack([hidden, same]))
    chex.assert_trees_all_close(batched, jnp.stack([fn(hidden), fn(same)]), atol=1e-6)


@pytest.mark.slow
def test_packed_runs_equal_each_alone():
    per_run = [{"lambda_spl": 1.0, "learning_rate": 5e-3},
               {"lambda_spl": 0.5, "learning_rate": 1e-2}]
    together, history = packing.run_steps(
        setup := _setup(per_run=per_run), packing.one_device_step(setup), 2)
    for c in range(2):
        alone = packing.alone(_setup(per_run=per_run), c)
        state, alone_history = packing.run_steps(alone, packing.one_device_step(alone), 2)
        for h_alone, h_together in zip(alone_history, history, strict=True):
            for name in ("loss", "spl", "diffusion"):
                np.testing.assert_allclose(h_alone[name][0], h_together[name][c], rtol=1e-5)
        np.testing.assert_allclose(state.params["embeds"][0], together.params["embeds"][c],
                                   rtol=0, atol=2e-5)


def test_sdxl_and_bad_pool_are_one_line():
    from core_jax.config import stage_config
    from core_jax.train.stages import check_stage

    with pytest.raises(InputError, match="one text encoder"):
        METHOD.terms(Settings({"spl_pool": "paper"}, encoder_widths=(768, 1280)))
    stage = stage_config(("textual_inversion", "class_diffusion"), spl_pool="eos")
    with pytest.raises(InputError, match="spl_pool is 'eos'; choose one of paper"):
        check_stage("stage1", stage)


MICRO = [
    "--config.model.preset=micro", "--config.data.resolution=16", "--config.data.num_views=4",
    "--config.stage1.steps=2", "--config.stage1.batch_size=2",
    "--config.sample.steps=2", "--config.sample.images_per_prompt=1",
    "--config.sample.prompts=('a photo of a {} {cls}',)", "--config.log_every=1",
    "--config.checkpoint_every=2",
]


@pytest.mark.slow
def test_core_jax_train_with_class_diffusion_tiny(tmp_path):
    """configs/class_diffusion_tiny.py shrunk to micro and 2 steps: both terms logged and
    finite, the Custom Diffusion K/V and the token exported."""
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "core_jax", "train", "--config",
         str(ROOT / "configs/class_diffusion_tiny.py"), "--workdir", str(workdir), *MICRO],
        capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("step") == 2][-1]
    assert np.isfinite(last["diffusion"]) and 0 < last["spl"] < 2
    assert (workdir / "pytorch_custom_diffusion_weights.safetensors").is_file()
    assert (workdir / "learned_embeds.safetensors").is_file()


def test_sd15_config_holds_the_scripts_recipe():
    import importlib.util

    from core_jax.train import setup as run_setup

    spec = importlib.util.spec_from_file_location("cd15", ROOT / "configs/class_diffusion_sd15.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    s = c.stage1
    assert tuple(s.methods) == ("custom_diffusion", "class_diffusion")
    assert (s.steps, s.batch_size, s.lambda_spl, s.spl_pool) == (500, 2, 1.0, "paper")
    assert s.learning_rate == pytest.approx(2e-5) and s.weight_decay == 1e-2
    assert c.data.augmentation == "custom_diffusion" and c.data.flip_p == 0.5
    c.concept.super_category = "dog"
    run_setup.check_config(c)

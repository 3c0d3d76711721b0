"""DreamBooth = the stage ("unet_finetune", "prior_preservation"): the prior term is lambda_prior
times the MSE of the class rows (computed here by hand), lambda_prior = 0 takes it out of a
run's update, a class pool is generated once per key and reused (by the same job, a second run,
a rerun and a sweep; generations counted), `core-jax train --config configs/dreambooth_tiny.py`
runs end to end, and a 2-run sweep packs into one program with each run equal to it alone."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from core_jax.config import base_config, stage_config
from core_jax.diffusion import add_noise
from core_jax.errors import InputError
from core_jax.text import fill_prompt, load_tokenizer, tokenize
from core_jax.train import class_pool
from core_jax.train import setup as run_setup
from core_jax.train.loop import _prior_stage, latent_size
from core_jax.train.passes import draw_batch
from core_jax.train.stages import build_program
from core_jax.train.step import stage_loss
from core_jax.train.synthetic import random_setup

ROOT = Path(__file__).resolve().parents[1]
DREAMBOOTH = ("unet_finetune", "prior_preservation")
# Three runs weighting the prior 1, 0.5 and 0, on tiny models with one resnet per block.
LAMBDAS = (1.0, 0.5, 0.0)
PACK = dict(preset="tiny", unet_overrides={"layers_per_block": 1}, num_concepts=3,
            batch_size=2, learning_rate=5e-6)


def _first_step(setup):
    """The batch of the setup's first step, and the gradient of its loss with respect to the
    trained groups with the terms per run [C]."""
    program = setup.program
    batch = draw_batch(setup.state.rng, setup.state.step, setup.data, setup.schedule,
                       jnp.arange(program.batch_size))
    trained = {g: setup.state.params[g] for g in program.trains}
    loss = functools.partial(stage_loss, params=setup.state.params, batch=batch, data=setup.data,
                             numbers=setup.numbers, frozen=setup.frozen, schedule=setup.schedule,
                             program=program)
    return batch, *jax.jit(jax.grad(loss, has_aux=True))(trained)


@pytest.fixture(scope="module")
def pack():
    return random_setup(methods=DREAMBOOTH, class_pool_size=3,
                        per_run=[{"lambda_prior": x} for x in LAMBDAS], **PACK)


@pytest.fixture(scope="module")
def pack_step(pack):
    return _first_step(pack)


# --- The term ----------------------------------------------------------------------------------

def test_prior_term_is_lambda_times_the_mse_of_the_class_rows(pack, pack_step):
    """Each run's prior term is the MSE between the U-Net's prediction for its class rows
    (drawn from its own pool, noised at their own timesteps, with the encoding of "a photo of
    a <cls>") and their noise, here computed by a plain U-Net call; the loss adds it times the
    run's lambda_prior. The pack's U-Net call batches these rows with the caption rows, the
    hand call does not: a few ulp (rtol 1e-5)."""
    batch, _, values = pack_step
    rows, num_concepts = PACK["batch_size"], PACK["num_concepts"]
    per_concept = lambda a: np.asarray(a).reshape((num_concepts, rows) + a.shape[1:])  # noqa: E731
    prior_x0, prior_noise, prior_t = map(per_concept, (batch.prior_x0, batch.prior_noise,
                                                       batch.prior_timesteps))
    class_mean = np.asarray(pack.data.class_mean)
    tokenizer = load_tokenizer()
    unet = jax.jit(lambda p, x, t, context: pack.unet.apply({"params": p}, x, t, context))
    want = []
    for c, super_category in enumerate(("cat", "dog", "teddy bear")):
        # The class rows are draws around entries of the run's own pool (std 0.05), no other's.
        for x in prior_x0[c]:
            near = [np.abs(x - p).max() for p in class_mean.reshape((-1,) + x.shape)]
            assert np.argmin(near) // class_mean.shape[1] == c and min(near) < 0.5
        hidden = pack.text_encoder.apply(
            {"params": pack.frozen["text"]},
            jnp.asarray(tokenize(tokenizer, [f"a photo of a {super_category}"])),
        ).last_hidden_state[0]
        chex.assert_trees_all_close(pack.data.class_hidden[c], hidden, rtol=1e-5, atol=1e-6)
        x_t = add_noise(pack.schedule, prior_x0[c], prior_noise[c], prior_t[c])
        pred = unet(pack.frozen["unet"], x_t, prior_t[c],
                    jnp.broadcast_to(hidden, (rows, *hidden.shape)))
        want.append(np.mean(np.square(np.asarray(pred, np.float64) - prior_noise[c])))
    # Own timesteps and noise, not the photo rows'.
    assert not np.array_equal(batch.prior_timesteps, batch.timesteps)
    assert not np.allclose(batch.prior_noise, batch.noise)
    chex.assert_trees_all_close(values["prior"], np.asarray(want, np.float32), rtol=1e-5)
    weighted = values["diffusion"] + jnp.asarray(LAMBDAS) * values["prior"]
    chex.assert_trees_all_close(values["loss"], weighted, rtol=1e-6)


def test_lambda_zero_takes_the_prior_out(pack, pack_step):
    """A run weighting the prior 0 in a pack whose other runs weight it: its loss is its
    diffusion loss exactly and its U-Net gradient that of the same run without
    prior_preservation (ulp: its caption rows were batched with the class rows), while a
    weighted run's gradient differs from its gradient without the prior by far more. When no
    run weights it, the term and the class pool are not in the program at all."""
    _, grads, values = pack_step
    np.testing.assert_array_equal(values["loss"][2], values["diffusion"][2])
    assert values["prior"][2] > 0  # computed (the pack needs it), weighted 0

    plain = random_setup(methods=("unet_finetune",), **PACK)
    assert plain.data.class_mean is None
    _, plain_grads, plain_values = _first_step(plain)
    chex.assert_trees_all_close(values["diffusion"], plain_values["diffusion"], rtol=1e-5)

    def error(c: int) -> float:
        got, want = (np.concatenate([np.ravel(x[c]) for x in jax.tree.leaves(g["unet"])])
                     for g in (grads, plain_grads))
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    assert error(2) < 1e-5, error(2)
    assert error(0) > 1e-2 and error(1) > 1e-2, (error(0), error(1))

    config = base_config()
    config.stage1 = stage_config(DREAMBOOTH, lambda_prior=0.0)
    program = build_program([config.stage1], plain.program.models, "epsilon")
    assert "prior" not in {t.name for t in program.terms}
    assert not program.needs & {"prior_pred", "prior_target"}
    assert _prior_stage(config, ["stage1"], [program]) is None  # no pool made for it


def test_caption_and_prompts_name_each_concepts_class():
    assert (fill_prompt("a photo of a {} {cls}", "<s*>", "teddy bear")
            == "a photo of a <s*> teddy bear")
    config = base_config()
    config.concept.super_category = "dog"
    config.concept.caption = "a photo of a {cls}"  # S* missing: one line, before any work
    with pytest.raises(InputError) as err:
        run_setup.check_config(config)
    assert str(err.value) == ("prompt 'a photo of a {cls}' must contain exactly one '{}' (for S*) "
                              "and no brace besides it and '{cls}' (the class word)")


def test_a_rare_token_start_makes_s_star_that_token():
    """`concept.init_word = "sks"`: S* starts at the input embedding of "sks", so with S*
    frozen (DreamBooth proper) "a photo of a S* dog" encodes as "a photo of a sks dog"; without
    it S* starts at the class word and the concept data is as before (no new leaf)."""
    from core_jax.methods.textual_inversion import EMBEDS
    from core_jax.models.presets import get_preset, random_models
    from core_jax.text import add_placeholder_tokens, encode_with_learned, placeholder_slots
    from core_jax.train.concepts import ConceptSpec, build_concept_data

    models = random_models(get_preset("tiny"), 0, jnp.float32)
    tokenizer = load_tokenizer()
    placeholder_ids = add_placeholder_tokens(tokenizer, "<s*>", 1)
    pool = np.zeros((2, 8, 8, 4), np.float32)
    text_params = models.params["text"]

    def start(init_word: str):
        spec = ConceptSpec("dog", "dog", ("a photo of a {}",), init_word=init_word)
        data = build_concept_data(tokenizer, models.text_encoder, text_params, "<s*>", [spec],
                                  [(pool, pool)])
        return data, EMBEDS.init(None, data, {}, 1, jnp.zeros((1, 2), jnp.uint32))[0]  # [V, D]

    data, embeds = start("sks")
    table = text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    (sks,) = tokenizer.encode("sks", add_special_tokens=False)
    np.testing.assert_array_equal(embeds[0], table[sks])
    ids = tokenize(tokenizer, ["a photo of a <s*> dog"])
    ours = encode_with_learned(models.text_encoder, text_params, jnp.asarray(ids), embeds,
                               placeholder_slots(ids, placeholder_ids))
    want = models.text_encoder.apply(
        {"params": text_params}, jnp.asarray(tokenize(tokenizer, ["a photo of a sks dog"]))
    ).last_hidden_state
    chex.assert_trees_all_close(ours, want, rtol=1e-6, atol=1e-6)

    data, embeds = start("")
    assert data.init_embed is None
    np.testing.assert_array_equal(embeds[0], data.super_embed[0])

    config = micro_config()
    config.concept.init_word = " "
    with pytest.raises(InputError) as err:
        run_setup.concept_text(config, load_tokenizer())
    assert str(err.value) == ("concept.init_word ' ' gives no tokens; give a word such as 'sks', "
                              "or '' to start S* at the super-category")


def test_dreambooth_sd15_holds_the_papers_numbers():
    from test_configs import load

    c = load(ROOT / "configs" / "dreambooth_sd15.py").get_config()
    s = c.stage1
    assert s.methods == DREAMBOOTH and c.stage2.steps == 0
    assert (s.steps, s.learning_rate, s.lambda_prior, s.num_class_images) == (1000, 5e-6, 1.0, 200)
    assert (s.batch_size, s.weight_decay, s.clip_norm) == (1, 1e-2, 1.0)
    assert (s.class_prompt, s.class_steps, s.class_guidance_scale) == ("a photo of a {}", 50, 7.5)
    assert c.concept.caption == "a photo of a {} {cls}" and c.data.resolution == 512
    assert c.concept.init_word == "sks"


# --- Class pools -------------------------------------------------------------------------------

def micro_config(**stage: object) -> ml_collections.ConfigDict:
    """Micro models, DreamBooth for 2 steps on 3 class images sampled in 2 steps."""
    c = base_config()
    c.model.preset = "micro"
    c.concept.name, c.concept.images, c.concept.super_category = "chelsea", "builtin:chelsea", "cat"
    c.concept.caption = "a photo of a {} {cls}"
    c.data.resolution, c.data.num_views = 16, 4
    c.stage1 = stage_config(DREAMBOOTH, **{
        "steps": 2, "batch_size": 2, "learning_rate": 1e-4, "num_class_images": 3,
        "class_steps": 2, **stage,
    })
    c.stage2.steps = 0
    c.sample.at_end = False
    c.log_every = c.checkpoint_every = 1
    return c


@pytest.fixture
def generations(monkeypatch) -> list[class_pool.PoolSpec]:
    """Every class-image generation of this process, by spec."""
    made = []
    generate = class_pool.generate_class_images

    def counted(models, spec, progress=None):
        made.append(spec)
        return generate(models, spec, progress)

    monkeypatch.setattr(class_pool, "generate_class_images", counted)
    return made


def test_a_pool_is_generated_once_per_key_and_read_back(tmp_path, generations):
    config = micro_config()
    models = run_setup.load_models(config)
    spec = class_pool.pool_spec(config, "stage1", models.identity)
    assert spec.prompt == "a photo of a cat" and spec.count == 3
    folder = tmp_path / "pools"
    pools = class_pool.ClassPools(folder)
    mean, std = pools.get(spec, models)
    assert mean.shape == std.shape == (3, *latent_size(config, models))
    assert np.isfinite(mean).all()
    assert len(generations) == pools.generated == 1
    for suffix in (".npz", ".json", ".png"):
        assert (folder / f"{spec.key}{suffix}").is_file()
    assert json.loads((folder / f"{spec.key}.json").read_text()) == dataclasses.asdict(spec)
    assert pools.get(spec, models)[0] is mean  # the job's other packs: from memory
    again = class_pool.ClassPools(folder).get(spec, models)  # another job: from disk
    np.testing.assert_array_equal(again[0], mean)
    np.testing.assert_array_equal(again[1], std)
    assert len(generations) == 1

    # The key decides the contents: made again elsewhere, the same pool bit for bit.
    elsewhere = class_pool.ClassPools(tmp_path / "elsewhere").get(spec, models)
    np.testing.assert_array_equal(elsewhere[0], mean)
    assert len(generations) == 2

    # Whatever changes the contents changes the key, and a new pool is made.
    changed = [
        micro_config(num_class_images=4),
        micro_config(class_seed=1),
        micro_config(class_prompt="a picture of a {}"),
        micro_config(class_steps=3),
    ]
    other_class = micro_config()
    other_class.concept.super_category = "dog"
    other_model = micro_config()
    other_model.seed = 1
    specs = [class_pool.pool_spec(c, "stage1", models.identity) for c in (*changed, other_class)]
    specs.append(class_pool.pool_spec(other_model, "stage1", run_setup.model_identity(other_model)))
    assert len({s.key for s in specs} | {spec.key}) == len(specs) + 1
    later = class_pool.ClassPools(folder)
    for s in specs[:3]:  # generating each of them is the same code path: three suffice
        assert later.get(s, models)[0].shape[0] == s.count
    assert [g.key for g in generations[2:]] == [s.key for s in specs[:3]]

    # A pool cut short (a crash mid-write, a disk error) is made anew, not trusted.
    (folder / f"{spec.key}.npz").write_bytes(b"not a pool")
    remade = class_pool.ClassPools(folder).get(spec, models)
    np.testing.assert_array_equal(remade[0], mean)
    assert len(generations) == 6


# --- End to end --------------------------------------------------------------------------------

MICRO = [
    "--config.model.preset=micro", "--config.data.resolution=16", "--config.data.num_views=4",
    "--config.stage1.steps=2", "--config.stage1.num_class_images=3",
    "--config.stage1.class_steps=2", "--config.sample.steps=2",
    "--config.sample.images_per_prompt=1", "--config.sample.prompts=('a photo of a {} {cls}',)",
    "--config.log_every=1", "--config.checkpoint_every=2",
]


def _train(workdir: Path, *overrides: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "core_jax", "train", "--config",
         str(ROOT / "configs/dreambooth_tiny.py"), "--workdir", str(workdir), *MICRO, *overrides],
        capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _generated(output: str) -> int:
    return sum(line.startswith("generating ") for line in output.splitlines())


@pytest.mark.slow
def test_core_jax_train_dreambooth_tiny_end_to_end_and_its_pool_reused(tmp_path):
    """`core-jax train --config configs/dreambooth_tiny.py`, shrunk to micro models and 2
    steps, generates its class pool once, trains both terms and writes its outputs; the same
    command again (a rerun) and a second run pointed at the first one's pools generate
    nothing."""
    workdir = tmp_path / "run"
    output = _train(workdir, "--config.concept.init_word=sks")
    assert _generated(output) == 1
    pools = sorted((workdir / "class_pools").iterdir())
    assert [p.suffix for p in pools] == [".json", ".npz", ".png"]
    spec = json.loads(pools[0].read_text())
    assert spec["prompt"] == "a photo of a cat" and spec["count"] == 3
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "prior" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert np.isfinite(r["prior"]) and r["prior"] > 0 and np.isfinite(r["diffusion"])
        np.testing.assert_allclose(r["loss"], r["diffusion"] + r["prior"], rtol=1e-6)
    for name in ("learned_embeds.safetensors", "unet/diffusion_pytorch_model.safetensors",
                 "unet/config.json", "a1111/chelsea.safetensors"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "samples").glob("*.png"))
    # S* frozen at the rare token it started from: the exported vector is "sks"'s embedding.
    from core_jax.train.outputs import load_run_config

    text_params = run_setup.load_models(load_run_config(workdir)).params["text"]
    table = text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    (sks,) = load_tokenizer().encode("sks", add_special_tokens=False)
    learned = load_file(workdir / "learned_embeds.safetensors")["<s*>"]
    np.testing.assert_array_equal(learned.reshape(-1), table[sks])
    written = pools[1].stat().st_mtime_ns

    assert _generated(_train(workdir, "--config.concept.init_word=sks")) == 0  # a rerun
    assert pools[1].stat().st_mtime_ns == written
    shared = f"--config.stage1.class_pool_dir={workdir / 'class_pools'}"
    second = _train(tmp_path / "second", "--config.concept.init_word=sks", shared)
    assert _generated(second) == 0
    assert not (tmp_path / "second" / "class_pools").exists()


@pytest.mark.slow
def test_a_dreambooth_sweep_packs_and_each_run_equals_it_alone(tmp_path, generations):
    """Two runs of one concept (lambda_prior 1 and 0) packed into one program: one class pool
    generated for both; each run trained alone from its saved config reads that pool (the
    lambda 0 run needs none) and ends at the same U-Net. Tolerance as tests/test_sweep.py
    argues: the pack batches other rows (another summation order), and Adam moves a weight by
    up to lr a step whatever its gradient's size, so near-zero gradients show the order at the
    scale of lr: every weight within lr, 99.9 % within 1e-5 relative; a wrong update (the other
    run's data, a prior term that should be off) moves most weights by whole steps."""
    from core_jax.train.loop import train
    from core_jax.train.sweep import sweep

    shared = tmp_path / "pools"
    c = micro_config(class_pool_dir=str(shared))
    c.log_every = c.checkpoint_every = 2
    c.sweep = ml_collections.ConfigDict()
    c.sweep.concepts = (dict(name="chelsea", images="builtin:chelsea", super_category="cat",
                             templates="animate"),)
    c.sweep.grid = (("stage1.lambda_prior", (0.0, 1.0)),)
    c.sweep.pack = 2
    c.sweep.concept_shards = 0
    summary = sweep(c, tmp_path / "sweep")
    assert summary["runs"] == 2 and len(summary["groups"]) == 1
    assert summary["groups"][0]["compilations"] == [1]
    results = {r["run"]: r for r in summary["results"]}
    assert all(r["status"] == "done" for r in results.values())
    assert len(generations) == 1  # one pool for both runs
    without = results["chelsea__lambda_prior=0.0"]
    assert without["loss"] == without["diffusion"] and without["prior"] > 0

    unets = {}
    for name in results:
        folder = tmp_path / "sweep" / "runs" / name
        config = ml_collections.ConfigDict(json.loads((folder / "config.json").read_text()))
        train(config, tmp_path / "alone" / name)
        unets[name] = [load_file(f / "unet" / "diffusion_pytorch_model.safetensors")
                       for f in (tmp_path / "alone" / name, folder)]
    assert len(generations) == 1  # the alone runs read the sweep's pool
    lr = c.stage1.learning_rate
    for name, (alone, swept) in unets.items():
        close = total = 0
        for key, value in swept.items():
            np.testing.assert_allclose(alone[key], value, rtol=0, atol=lr, err_msg=f"{name} {key}")
            close += int(np.isclose(alone[key], value, rtol=1e-5, atol=1e-6).sum())
            total += value.size
        assert close >= 0.999 * total, f"{name}: {total - close} of {total} weights differ"
    weighted, unweighted = (unets[f"chelsea__lambda_prior={x}"][1] for x in ("1.0", "0.0"))
    moved = sum(int((~np.isclose(weighted[k], unweighted[k], rtol=1e-5, atol=1e-6)).sum())
                for k in weighted)
    assert moved > 0.5 * sum(v.size for v in weighted.values())  # the prior changed the update

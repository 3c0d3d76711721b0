"""Per-run training and scoring seconds of `core-jax benchmark` at the toy model v2's shapes, for
the runtime estimates in configs/toy_benchmark_v2.py and configs/toy_lambda_search.py.

A v2-size model with random weights (the speed does not depend on the weights) and a random
classifier are written to a temporary folder. Its U-Net takes 3 input channels, not v2's 5: the
train step and the sampler do not append coordinate channels yet (a 5-channel folder stops in
load_models), and two more input channels of the first 3x3 convolution change the cost by far
less than this machine's noise; the v2 benchmark config, cut to CONCEPTS test
concepts x TI and CoRe x 1 seed, runs twice, at STEPS_A and STEPS_B stage-1 steps, so that the
difference gives seconds per step of a pack and the rest is compilation and fixed cost.

    PYTHONPATH=. python benchmarks/toy_benchmark_timing.py [--pack 16] [--concepts 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from core_jax.text import load_tokenizer
from core_jax.toyworld import benchmark, model_v2
from core_jax.toyworld import classifier as attribute_classifier

ROOT = Path(__file__).resolve().parents[1]


def v2_config():
    spec = importlib.util.spec_from_file_location("v2", ROOT / "configs/toy_benchmark_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("main")


def random_assets(folder: Path) -> tuple[Path, Path]:
    vocabulary = model_v2.world_vocabulary(load_tokenizer())
    architecture = model_v2.Architecture(
        unet=dataclasses.replace(model_v2.UNET_CONFIG, in_channels=3)
    )
    _, _, params = model_v2.init_models(0, vocabulary, architecture)
    model_dir = model_v2.export(folder / "toy_model_v2", params, vocabulary, {}, architecture)
    module = attribute_classifier.AttributeClassifier()
    res = attribute_classifier.RESOLUTION
    classifier_params = module.init(jax.random.key(0), jnp.zeros((1, res, res, 3)))["params"]
    return model_dir, attribute_classifier.save_params(folder / "classifier.safetensors",
                                                       classifier_params)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pack", type=int, default=16)
    parser.add_argument("--concepts", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs=2, default=(20, 60))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, classifier_path = random_assets(Path(tmp))
        record = {"pack": args.pack, "concepts": args.concepts, "runs": {}}
        for steps in args.steps:
            config = v2_config()
            config.model.path = str(model_dir)
            config.benchmark.classifier = str(classifier_path)
            config.sweep.concepts = config.sweep.concepts[: args.concepts]
            config.benchmark.seeds = (0,)
            config.sweep.pack = args.pack
            config.stage1.steps = steps
            config.stage1.rescale_start, config.stage1.rescale_end = steps // 3, steps // 2
            config.checkpoint_every = 10 * steps  # no mid-run checkpoints: 200-step runs have 1
            started = time.perf_counter()
            results = benchmark.run_benchmark(config, Path(tmp) / f"work{steps}", log=print)
            record["runs"][steps] = {**results["seconds"], "wall": time.perf_counter() - started,
                                     "n_runs": 2 * args.concepts}
            print(json.dumps(record, indent=2), flush=True)


if __name__ == "__main__":
    main()

"""Rebuild the toy world's shipped assets: the attribute classifiers and the toy model.

The shipped model was made in two rounds (6000 steps in all, about 50 minutes on a 2-core CPU):

    .venv/bin/python launch/pretrain_toy.py --out /tmp/toy_a                  # 3000 steps, lr 2e-3
    .venv/bin/python launch/pretrain_toy.py --out core_jax/toyworld/assets --skip-classifier \
        --start-from /tmp/toy_a/toy_model --steps 3000 --learning-rate 1e-3 --seed 1
    # (copy /tmp/toy_a/classifier.safetensors into core_jax/toyworld/assets first)

Trains the classifiers on fresh world samples, pretrains the toy text-to-image model (text
encoder + pixel-space U-Net) on the world minus its held-out concepts, then measures: classifier
accuracy per attribute on fresh samples (32 and 64 pixels), and the toy model's prompt following,
i.e. the classifiers' accuracy on images generated from full captions, for held-out identities and
for seen ones. Results go to `<out>/toy_model/toyworld.json` and stdout (RESULTS.md has them).
Everything is seeded.

The toy model v2 (`core_jax/toyworld/model_v2.py`: 4-layer text encoder, wider U-Net with
coordinate channels, 48 held-out identities) is trained by `--v2`, in the background, for hours;
it checkpoints every 5 minutes and at each evaluation, and rerunning the same command resumes
from the checkpoint (SIGTERM also checkpoints before exiting):

    nohup nice -n 19 .venv/bin/python launch/pretrain_toy.py --v2 --run-dir runs/toy_v2 \
        >> runs/toy_v2.log 2>&1 &

Progress: `runs/toy_v2/metrics.jsonl` (loss every 100 steps; every 1000 steps the held-out
captions' accuracy per attribute, read back by the shipped classifiers), the EMA model exported
at each evaluation to `runs/toy_v2/model/`. `--steps` moves the end of the schedule (the
learning rate is constant until the last `--decay-steps`); `--export DIR` writes the latest
checkpoint's EMA model to DIR (e.g. core_jax/toyworld/assets/toy_model_v2) and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from core_jax.toyworld import ASSETS, CLASSIFIER_PATH, MODEL_DIR
from core_jax.toyworld import classifier as attribute_classifier
from core_jax.toyworld import model as toy_model
from core_jax.toyworld.world import HELD_OUT_IDENTITIES


def _fmt(scores: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in scores.items())


def main_v2(argv: list[str]) -> None:
    from core_jax.toyworld import model_v2

    defaults = model_v2.PretrainConfigV2()
    parser = argparse.ArgumentParser(description="pretrain the toy model v2 (resumable)")
    parser.add_argument("--v2", action="store_true")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/toy_v2"))
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--decay-steps", type=int, default=defaults.decay_steps)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--checkpoint-every-s", type=float, default=300.0)
    parser.add_argument("--stop-after-s", type=float, default=None,
                        help="checkpoint and exit after this many seconds")
    parser.add_argument("--export", type=Path, default=None,
                        help="write the checkpoint's EMA model to this folder and exit")
    args = parser.parse_args(argv)
    config = dataclasses.replace(
        defaults, steps=args.steps, decay_steps=args.decay_steps,
        learning_rate=args.learning_rate,
    )
    if args.export is not None:
        folder = model_v2.export_checkpoint(args.run_dir, args.export)
        print(f"wrote {folder}")
        return
    classifier_params = attribute_classifier.load_params(CLASSIFIER_PATH)
    model_v2.pretrain(
        args.run_dir, config, classifier_params, eval_every=args.eval_every,
        checkpoint_every_s=args.checkpoint_every_s, stop_after_s=args.stop_after_s,
        log=lambda line: print(time.strftime("%H:%M:%S"), line, flush=True),
    )


def main() -> None:
    if "--v2" in sys.argv[1:]:
        main_v2(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets folder to write")
    parser.add_argument("--steps", type=int, default=toy_model.PretrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=toy_model.PretrainConfig.batch_size)
    parser.add_argument("--learning-rate", type=float,
                        default=toy_model.PretrainConfig.learning_rate)
    parser.add_argument("--classifier-steps", type=int, default=800)
    parser.add_argument("--skip-classifier", action="store_true",
                        help="reuse <out>/classifier.safetensors")
    parser.add_argument("--eval-per-identity", type=int, default=16,
                        help="generated images per held-out identity (and as many seen scenes)")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-from", type=Path, default=None,
                        help="a saved toy model folder to continue pretraining from")
    args = parser.parse_args()
    out: Path = args.out
    classifier_path = out / CLASSIFIER_PATH.name
    info: dict = {}

    if args.skip_classifier:
        classifier_params = attribute_classifier.load_params(classifier_path)
    else:
        start = time.perf_counter()
        classifier_params = attribute_classifier.train_classifier(
            steps=args.classifier_steps, seed=args.seed
        )
        info["classifier_train_s"] = round(time.perf_counter() - start)
        attribute_classifier.save_params(classifier_path, classifier_params)
    info["classifier_accuracy_32px"] = attribute_classifier.evaluate(classifier_params, 2000)
    info["classifier_accuracy_64px"] = attribute_classifier.evaluate(
        classifier_params, 500, size=64
    )
    print("classifier, 32 px:", _fmt(info["classifier_accuracy_32px"]))
    print("classifier, 64 px:", _fmt(info["classifier_accuracy_64px"]))

    config = toy_model.PretrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        seed=args.seed,
        warmup_steps=min(toy_model.PretrainConfig.warmup_steps, args.steps // 10),
    )
    start = time.perf_counter()
    text_encoder, unet, params, curve = toy_model.pretrain(config, start_from=args.start_from)
    if args.start_from is not None:
        earlier = json.loads((args.start_from / "toyworld.json").read_text())["pretrain"]
        info["pretrained_before"] = earlier
    info["pretrain"] = {**vars(config), "train_s": round(time.perf_counter() - start),
                        "final_loss": float(np.mean(curve[-100:]))}
    folder = toy_model.save_toy_model(out / MODEL_DIR.name, text_encoder, unet, params, info)

    pipeline = toy_model.load_pipeline(folder)
    rng = np.random.default_rng(args.seed + 1)
    n = args.eval_per_identity * len(HELD_OUT_IDENTITIES)
    start = time.perf_counter()
    for name, identities in (("held_out", HELD_OUT_IDENTITIES), ("seen", None)):
        scenes = toy_model.evaluation_scenes(rng, n, identities)
        scores = toy_model.prompt_following(
            pipeline, classifier_params, scenes, guidance_scale=args.guidance_scale,
            seed=args.seed,
        )
        info[f"prompt_following_{name}"] = scores
        print(f"prompt following, {name} identities ({n} images):", _fmt(scores))
    info["prompt_following_eval"] = {"images_each": n, "guidance_scale": args.guidance_scale,
                                     "steps": 25, "eval_s": round(time.perf_counter() - start)}
    info_path = folder / "toyworld.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), **info}, indent=2))
    print(f"wrote {classifier_path} and {folder}")


if __name__ == "__main__":
    main()

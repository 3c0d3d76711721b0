"""A miniature world where personalization quality is measurable.

`world`: procedural images of one object (shape, colour, pattern, size, position) on a
background in a style, with plain English captions. `classifier`: small CNNs that read those
attributes back (the stand-ins for CLIP/DINO scores). `model`: a toy text-to-image model
pretrained on the world minus held-out concepts, shipped as a diffusers-style folder that
`core-jax train --config.model.path=...` loads. RESULTS.md has the numbers.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
CLASSIFIER_PATH = ASSETS / "classifier.safetensors"
MODEL_DIR = ASSETS / "toy_model"  # pass as --config.model.path
# The toy model v2 (model_v2.py), once exported there by launch/pretrain_toy.py --v2 --export.
MODEL_V2_DIR = ASSETS / "toy_model_v2"
TEMPLATES = Path(__file__).resolve().parent / "templates.txt"  # --config.concept.templates

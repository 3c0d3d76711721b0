"""Evaluation: CLIP-T / CLIP-I / DINO scores with our Flax CLIP and DINO models, image
preprocessing equal to transformers' processors, and the DreamBench protocol file."""

"""Training results in the formats other tools read: learned vectors and stage-2 U-Net weights.

- `save_learned_embeds`: diffusers' textual-inversion file, `{placeholder: [V, D]}` in
  safetensors. `pipe.load_textual_inversion(path)` adds the tokens "<p>", "<p>_1", ... (the names
  `core_jax.text.placeholder_tokens` gives) and expands "<p>" in prompts to all V of them.
- `save_a1111_embedding`: one tensor `emb_params` [V, D], the safetensors embedding that
  AUTOMATIC1111's webui and ComfyUI load from their embeddings folder; the file name (without
  `.safetensors`) is the prompt word there.
- `export_unet`: a diffusers `unet/` folder (`core_jax.weights.save_unet`).
- `save_lora`: U-Net LoRA adapters as `pytorch_lora_weights.safetensors`, peft/diffusers names,
  which `StableDiffusionPipeline.load_lora_weights(folder)` finds by that name; and with
  `kohya=True` kohya's names (`lora_unet_...lora_down/lora_up/alpha`), the file AUTOMATIC1111
  and ComfyUI load from their LoRA folder (`<lora:name:1>` in the webui's prompt).
- `save_svdiff`: SVDiff's spectral shifts as `spectral_shifts.safetensors`, one float32 vector
  per U-Net weight matrix named `<diffusers module>.delta` (svdiff-pytorch's parameter names);
  the U-Net they make goes out as a `unet/` folder beside it (`export_concept`).
- `save_xti_embeds` / `load_xti_embeds`: XTI's vectors per cross-attention layer as
  `xti_embeds.safetensors`, one [V, D] float32 tensor per layer named by its diffusers module
  ("down_blocks.0.attentions.0.transformer_blocks.0.attn2"), the placeholder in the metadata;
  read back in the U-Net's layer order for `core_jax.sample.generate` ([L, V, D]).
- `save_custom_diffusion`: Custom Diffusion's cross-attention keys and values as
  `pytorch_custom_diffusion_weights.safetensors` and, when torch is installed,
  `pytorch_custom_diffusion_weights.bin`, diffusers' names
  (`<attn2>.processor.to_k_custom_diffusion.weight`). diffusers 0.42's loader sets the processors
  only for the `.bin`, which alone can hold the empty entries of the self-attention layers, and
  only when given the pipeline:
  `pipe.unet.load_attn_procs(folder, weight_name="pytorch_custom_diffusion_weights.bin",
  _pipeline=pipe)`; the learned token is `learned_embeds.safetensors`
  (`pipe.load_textual_inversion(folder)`).

Every export is whole or absent: it is written under a temporary name in the destination's
folder and renamed into place, so a crash or error never leaves a partial file behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from core_jax import weights
from core_jax.errors import InputError
from core_jax.files import atomic_write_bytes, temp_sibling
from core_jax.layer_contexts import TimestepVectors
from core_jax.methods import custom_diffusion as custom_diffusion_method
from core_jax.methods import neti as neti_method
from core_jax.methods import svdiff as svdiff_method
from core_jax.methods.lora import LoraAdapters, kohya_state_dict, peft_state_dict
from core_jax.models.unet import UNet2DConditionModel

SDXL_KEYS = ("clip_l", "clip_g")  # encoder 1's (ViT-L) part, encoder 2's (bigG) part

LEARNED_EMBEDS_NAME = "learned_embeds.safetensors"  # the file name diffusers looks for
LORA_NAME = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights looks for
SVDIFF_NAME = "spectral_shifts.safetensors"  # svdiff-pytorch's file name for the shifts
# The names diffusers' save_attn_procs writes and its docs load.
CUSTOM_DIFFUSION_NAME = "pytorch_custom_diffusion_weights.safetensors"
CUSTOM_DIFFUSION_BIN_NAME = "pytorch_custom_diffusion_weights.bin"
XTI_NAME = "xti_embeds.safetensors"
NETI_NAME = "neti_mapper.safetensors"
A1111_KEY = "emb_params"


def _check_vectors(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise ValueError(f"learned vectors must be shaped [V, D] with V >= 1, got {vectors.shape}")
    if not np.all(np.isfinite(vectors)):
        raise ValueError("learned vectors contain NaN or infinity; refusing to export them")
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _output_file(path: str | os.PathLike, default_name: str) -> Path:
    """`path` itself, or `path/default_name` when `path` is an existing folder."""
    path = Path(path)
    if path.is_dir():
        return path / default_name
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: exported files must end in .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_learned_embeds(path: str | os.PathLike, placeholder: str, vectors: np.ndarray) -> Path:
    """Write diffusers' textual-inversion file `{placeholder: vectors [V, D]}` (float32).

    `path` is a `.safetensors` file or an existing folder (then `learned_embeds.safetensors`
    inside it, which `load_textual_inversion(folder)` finds). Returns the file written.
    """
    if not placeholder or any(c.isspace() for c in placeholder):
        raise ValueError(f"placeholder {placeholder!r} must be non-empty and without whitespace")
    vectors = _check_vectors(vectors)
    out = _output_file(path, LEARNED_EMBEDS_NAME)
    atomic_write_bytes(out, lambda: safetensors.numpy.save({placeholder: vectors}))
    return out


def load_learned_embeds(path: str | os.PathLike) -> tuple[str, np.ndarray]:
    """(placeholder, vectors [V, D] float32) from a one-tensor safetensors embedding file.

    Reads what `save_learned_embeds` writes (or a folder holding `learned_embeds.safetensors`).
    Other one-tensor files load too; an A1111 file gives the placeholder "emb_params".
    Pickled `.bin`/`.pt` files (including A1111's `string_to_param` ones) are refused.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LEARNED_EMBEDS_NAME
    if not path.is_file():
        raise InputError(f"no embedding file at {path}")
    if path.suffix != ".safetensors":
        raise InputError(
            f"{path}: only .safetensors embeddings are read (pickled files can run code when "
            "loaded); convert it to safetensors first"
        )
    try:
        state = safetensors.numpy.load_file(str(path))
    except Exception as err:  # the library raises several types for a damaged header
        raise InputError(f"{path} is not a readable safetensors file: {err}") from err
    if len(state) != 1:
        raise InputError(
            f"{path} holds {len(state)} tensors {sorted(state)[:5]}; a textual-inversion "
            "embedding has exactly one"
        )
    placeholder, vectors = next(iter(state.items()))
    if vectors.ndim == 1:  # old single-vector files store [D]
        vectors = vectors[None]
    if vectors.ndim != 2:
        raise InputError(f"{path}: embedding {placeholder!r} has shape {vectors.shape}, not [V, D]")
    return placeholder, vectors.astype(np.float32)


def save_a1111_embedding(
    path: str | os.PathLike, name: str, vectors: np.ndarray, step: int | None = None
) -> Path:
    """Write `{"emb_params": vectors [V, D]}` (float32) for AUTOMATIC1111's webui and ComfyUI.

    Those tools take the prompt word from the file name, so `path` is best an existing folder:
    the file is then `path/<name>.safetensors`. `name` and `step` go into the safetensors
    metadata; a second tensor would make the webui reject the file. Returns the file written.
    """
    if not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"embedding name {name!r} must be non-empty and without path separators")
    vectors = _check_vectors(vectors)
    out = _output_file(path, f"{name}.safetensors")
    metadata = {"name": name}
    if step is not None:
        metadata["step"] = str(int(step))
    atomic_write_bytes(out, lambda: safetensors.numpy.save({A1111_KEY: vectors}, metadata))
    return out


def save_sdxl_embedding(path: str | os.PathLike, name: str, vectors: np.ndarray,
                        width_1: int) -> Path:
    """Write an SDXL embedding `{"clip_l": [V, D1], "clip_g": [V, D2]}` (float32): the file
    AUTOMATIC1111's webui and ComfyUI read for SDXL, and diffusers' `load_textual_inversion` loads
    tensor by tensor into `text_encoder` ("clip_l") and `text_encoder_2` ("clip_g").

    `vectors` [V, D1 + D2] are the learned vectors as the SDXL pipeline injects them, encoder 1's
    `width_1` features first; `path` as in `save_a1111_embedding`. In diffusers with SDXL base's
    legacy encoder-2 config the pooled embedding is read at the loaded token, not at the
    end-of-text token where we train it (README, "SDXL")."""
    if not name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"embedding name {name!r} must be non-empty and without path separators")
    vectors = _check_vectors(vectors)
    if not 0 < width_1 < vectors.shape[1]:
        raise ValueError(f"width_1 {width_1} does not split vectors of width {vectors.shape[1]}")
    out = _output_file(path, f"{name}.safetensors")
    tensors = {SDXL_KEYS[0]: np.ascontiguousarray(vectors[:, :width_1]),
               SDXL_KEYS[1]: np.ascontiguousarray(vectors[:, width_1:])}
    atomic_write_bytes(out, lambda: safetensors.numpy.save(tensors, {"name": name}))
    return out


def load_sdxl_embedding(path: str | os.PathLike) -> np.ndarray:
    """The vectors [V, D1 + D2] of an SDXL embedding file (`save_sdxl_embedding`'s layout)."""
    state = safetensors.numpy.load_file(str(path))
    if set(state) != set(SDXL_KEYS):
        raise InputError(f"{path} holds {sorted(state)}; an SDXL embedding holds clip_l and clip_g")
    clip_l, clip_g = (np.atleast_2d(state[k]) for k in SDXL_KEYS)
    if clip_l.shape[0] != clip_g.shape[0]:
        raise InputError(f"{path}: clip_l has {clip_l.shape[0]} vectors, clip_g {clip_g.shape[0]}")
    return np.concatenate([clip_l, clip_g], axis=1).astype(np.float32)


def export_unet(
    folder: str | os.PathLike, unet_module: UNet2DConditionModel, unet_params: weights.Params
) -> Path:
    """Write `folder/unet/` (config.json + safetensors) for `UNet2DConditionModel.from_pretrained`.

    The folder is built beside the destination and renamed into place; an existing `unet/` is
    replaced only once the new one is complete. Returns the `unet/` folder.
    """
    target = Path(folder) / "unet"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_sibling(target, "tmp")
    staging.mkdir()
    try:
        weights.save_unet(staging, unet_module, unet_params)
        if target.exists():
            # A folder cannot be renamed over a non-empty one: move the old one aside first,
            # and back if the new one cannot take its place.
            old = temp_sibling(target, "old")
            os.replace(target, old)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def save_lora(
    path: str | os.PathLike, adapters: LoraAdapters | None, kohya: bool = False,
    text_encoder: LoraAdapters | None = None,
) -> Path:
    """Write one run's U-Net adapters (no concept axis) as safetensors: peft/diffusers names,
    or kohya's with `kohya=True`; `text_encoder`: its text-encoder adapters too (diffusers'
    `text_encoder.` names, TextBoost), in the same file as `load_lora_weights` reads both.
    `path` is a `.safetensors` file or an existing folder (then
    `pytorch_lora_weights.safetensors` inside it). Returns the file written."""
    if kohya and text_encoder is not None:
        raise ValueError("kohya names are written for U-Net adapters only")
    state = {}
    if adapters is not None:
        state = kohya_state_dict(adapters) if kohya else peft_state_dict(adapters)
    if text_encoder is not None:
        state.update(peft_state_dict(text_encoder, prefix="text_encoder"))
    if not all(np.all(np.isfinite(v)) for v in state.values()):
        raise ValueError("LoRA weights contain NaN or infinity; refusing to export them")
    out = _output_file(path, LORA_NAME)
    metadata = {"format": "pt"}  # what diffusers' own save_lora_weights writes
    atomic_write_bytes(out, lambda: safetensors.numpy.save(state, metadata))
    return out


def save_svdiff(path: str | os.PathLike, deltas: Any) -> Path:
    """Write one run's spectral shifts (no concept axis; `core_jax.methods.svdiff`) as
    safetensors, `<diffusers module>.delta` -> [k] float32. `path` is a `.safetensors` file or
    an existing folder (then `spectral_shifts.safetensors` inside it). Returns the file."""
    state = svdiff_method.state_dict(deltas)
    if not all(np.all(np.isfinite(v)) for v in state.values()):
        raise ValueError("spectral shifts contain NaN or infinity; refusing to export them")
    out = _output_file(path, SVDIFF_NAME)
    atomic_write_bytes(out, lambda: safetensors.numpy.save(state, {"format": "pt"}))
    return out


def xti_layer_name(layer: str) -> str:
    """A cross-attention layer's path ("down_blocks_0/attentions_0/transformer_blocks_0") as
    diffusers names its attention module
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2")."""
    return weights.path_to_torch_key((*layer.split("/"), "attn2", "kernel")).removesuffix(".weight")


def save_xti_embeds(
    path: str | os.PathLike, placeholder: str, layers: list[str], vectors: np.ndarray
) -> Path:
    """Write XTI's vectors [L, V, D] of one run, layer k's (path `layers[k]`,
    `core_jax.layer_contexts.cross_attention_layers`) under its diffusers module name, the
    placeholder in the metadata. `path` is a `.safetensors` file or an existing folder (then
    `xti_embeds.safetensors` inside it). Returns the file written."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 3 or vectors.shape[0] != len(layers):
        raise ValueError(f"XTI vectors must be [L, V, D] with L = {len(layers)} layers, got "
                         f"{vectors.shape}")
    state = {xti_layer_name(layer): _check_vectors(v) for layer, v in zip(layers, vectors,
                                                                         strict=True)}
    out = _output_file(path, XTI_NAME)
    atomic_write_bytes(out, lambda: safetensors.numpy.save(
        state, {"placeholder": placeholder, "format": "pt"}))
    return out


def load_xti_embeds(path: str | os.PathLike, layers: list[str]) -> tuple[str, np.ndarray]:
    """(placeholder, vectors [L, V, D] float32) from `save_xti_embeds`' file (or a folder
    holding it), layer k's vectors those of `layers[k]` (the U-Net's order); a file whose layers
    are not the U-Net's is an InputError."""
    path = Path(path)
    if path.is_dir():
        path = path / XTI_NAME
    if not path.is_file():
        raise InputError(f"no XTI embedding file at {path}")
    try:
        with safetensors.safe_open(str(path), "np") as f:
            placeholder = (f.metadata() or {}).get("placeholder", "")
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # the library raises several types for a damaged header
        raise InputError(f"{path} is not a readable safetensors file: {err}") from err
    names = [xti_layer_name(layer) for layer in layers]
    if set(state) != set(names):
        raise InputError(f"{path} holds vectors for layers {sorted(set(state) - set(names))[:3]} "
                         f"and lacks {sorted(set(names) - set(state))[:3]}: not this U-Net's")
    return placeholder, np.stack([state[n] for n in names]).astype(np.float32)


def save_custom_diffusion(folder: str | os.PathLike, kv: Any) -> dict[str, Path]:
    """Write one run's cross-attention K/V (no concept axis; `core_jax.methods.custom_diffusion`)
    into `folder` for diffusers' `load_attn_procs`: the safetensors file, and the `.bin` (torch's
    pickle, with an empty entry for every self-attention layer, the form diffusers' loader
    accepts) when torch can be imported. Returns the files written, by kind."""
    state = custom_diffusion_method.state_dict(kv)
    if not all(np.all(np.isfinite(v)) for v in state.values()):
        raise ValueError("Custom Diffusion weights contain NaN or infinity; refusing to export "
                         "them")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"custom_diffusion": folder / CUSTOM_DIFFUSION_NAME}
    atomic_write_bytes(written["custom_diffusion"],
                       lambda: safetensors.numpy.save(state, {"format": "pt"}))
    try:
        import torch
    except ImportError:
        return written

    def pickled() -> bytes:
        import io

        # Every attention layer needs an entry: the cross-attention ones carry the weights, the
        # self-attention ones (attn1 beside each attn2) an empty dict, as save_attn_procs writes.
        full: dict[str, Any] = {k: torch.from_numpy(v) for k, v in state.items()}
        for name in {k.rsplit(".processor.", 1)[0] for k in state}:
            full[name.removesuffix(".attn2") + ".attn1.processor"] = {}
        buffer = io.BytesIO()
        torch.save(full, buffer)
        return buffer.getvalue()

    written["custom_diffusion_bin"] = folder / CUSTOM_DIFFUSION_BIN_NAME
    atomic_write_bytes(written["custom_diffusion_bin"], pickled)
    return written


def file_stem(name: str) -> str:
    """A concept name as a file name: A1111 and ComfyUI take the prompt word from it."""
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name).strip("_")
    return stem or "concept"


def save_neti_mapper(
    path: str | os.PathLike, placeholder: str, layers: list[str], mapper: Any
) -> Path:
    """Write one run's NeTI mapper (`core_jax.methods.neti`: its layers and constants, without
    the concept axis) as float32 tensors named by their path ("hidden_0.kernel",
    "constants.frequencies", ...; kernels [in, out], flax's orientation, not torch's). The
    metadata says how to rebuild it: the placeholder, the U-Net's cross-attention layers in the
    mapper's layer order (diffusers module names, JSON), and the code's fixed numbers (JSON
    "config": time anchors, hidden width, token width, bypass, its scale 0.2, the timestep range
    of the anchors, LeakyReLU slope, LayerNorm eps). `path` is a `.safetensors` file or an
    existing folder (then `neti_mapper.safetensors` inside it). Returns the file written."""
    flat = {".".join(str(k.key) for k in key_path): np.asarray(leaf, np.float32)
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(dict(mapper))[0]}
    num_layers = flat["constants.layers"].shape[0]
    if num_layers != len(layers):
        raise ValueError(f"the mapper has {num_layers} layers, the U-Net {len(layers)}")
    config = {
        "num_layers": num_layers,
        "num_time_anchors": flat["input.kernel"].shape[1] // num_layers,
        "num_frequencies": flat["constants.frequencies"].shape[0],
        "hidden": flat["hidden_1.bias"].shape[0],
        "width": flat["output.bias"].shape[0],
        "bypass": "bypass.kernel" in flat,
        "bypass_scale": neti_method.BYPASS_SCALE,
        "timestep_range": neti_method.TIMESTEP_RANGE,
        "leaky_slope": neti_method.LEAKY_SLOPE,
        "layer_norm_eps": neti_method.LAYER_NORM_EPS,
    }
    metadata = {"placeholder": placeholder, "format": "pt", "method": "neti",
                "layers": json.dumps([xti_layer_name(layer) for layer in layers]),
                "config": json.dumps(config)}
    out = _output_file(path, NETI_NAME)
    atomic_write_bytes(out, lambda: safetensors.numpy.save(flat, metadata))
    return out


def load_neti_mapper(path: str | os.PathLike, layers: list[str]) -> tuple[str, dict[str, Any]]:
    """(placeholder, the mapper as `core_jax.methods.neti` reads it) from `save_neti_mapper`'s
    file (or a folder holding it); a file written for another U-Net's layers is an InputError.
    `neti_vectors` makes the sampler's `TimestepVectors` of it."""
    path = Path(path)
    if path.is_dir():
        path = path / NETI_NAME
    if not path.is_file():
        raise InputError(f"no NeTI mapper file at {path}")
    try:
        with safetensors.safe_open(str(path), "np") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        saved_layers = json.loads(metadata.get("layers", "[]"))
    except Exception as err:  # the library raises several types for a damaged header
        raise InputError(f"{path} is not a readable NeTI mapper file: {err}") from err
    if saved_layers != [xti_layer_name(layer) for layer in layers]:
        raise InputError(f"{path} was written for cross-attention layers {saved_layers[:2]}..., "
                         "not this U-Net's")
    mapper: dict[str, Any] = {}
    for name, tensor in state.items():
        *parents, leaf = name.split(".")
        node = mapper
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = tensor
    return metadata.get("placeholder", ""), mapper


def neti_vectors(mapper: dict[str, Any], truncation: int | None = None) -> TimestepVectors:
    """What `core_jax.sample.generate` takes to draw with a NeTI mapper; `truncation` k keeps
    only the mapper's first k hidden units (the code's `truncation_idx`; None: all)."""
    hidden = np.shape(mapper["hidden_1"]["bias"])[-1]
    if truncation is not None and not 0 <= truncation <= hidden:
        raise InputError(f"NeTI truncation is {truncation}; give 0..{hidden} (the mapper's "
                         "hidden units)")
    return TimestepVectors(jax.tree.map(jnp.asarray, mapper), neti_method.timestep_vectors,
                           neti_method.apply_bypass,
                           None if truncation is None else jnp.int32(truncation))


def export_concept(
    folder: str | os.PathLike,
    *,
    name: str,
    placeholder: str,
    vectors: np.ndarray | None = None,
    unet: tuple[UNet2DConditionModel, weights.Params] | None = None,
    lora: LoraAdapters | None = None,
    svdiff: Any | None = None,
    custom_diffusion: Any | None = None,
    text_lora: LoraAdapters | None = None,
    step: int | None = None,
    sdxl_width_1: int | None = None,
    xti: tuple[list[str], np.ndarray] | None = None,
    neti: tuple[list[str], Any] | None = None,
) -> dict[str, Path]:
    """Everything a run hands to other tools, written the one way every run writes it:
    `learned_embeds.safetensors` (diffusers) and `a1111/<name>.safetensors` (A1111, ComfyUI)
    for learned vectors [V, D], `unet/` (a diffusers folder) for a trained U-Net (module,
    params), `pytorch_lora_weights.safetensors` (diffusers) and `a1111/lora/<name>.safetensors`
    (kohya: A1111, ComfyUI) for U-Net adapters (the first also holds text-encoder adapters,
    `text_lora`), `spectral_shifts.safetensors` for SVDiff's
    shifts (whose merged U-Net is `unet`), `pytorch_custom_diffusion_weights.safetensors` (and
    `.bin`) for Custom Diffusion's K/V, `xti_embeds.safetensors` for XTI's (layer paths,
    vectors [L, V, D]), `neti_mapper.safetensors` for NeTI's mapper (layer paths, mapper).
    SDXL vectors [V, D1 + D2] (`sdxl_width_1` = D1): the
    A1111 file is the SDXL embedding (`clip_l`, `clip_g`; diffusers loads it tensor by tensor),
    and learned_embeds.safetensors keeps them whole for `core-jax sample`. Returns what was
    written, by kind."""
    folder = Path(folder)
    written = {}
    if vectors is not None:
        written["learned_embeds"] = save_learned_embeds(
            folder / LEARNED_EMBEDS_NAME, placeholder, vectors
        )
        (folder / "a1111").mkdir(exist_ok=True)
        a1111 = folder / "a1111" / f"{file_stem(name)}.safetensors"
        if sdxl_width_1 is None:
            written["a1111"] = save_a1111_embedding(a1111, file_stem(name), vectors, step=step)
        else:
            written["a1111"] = save_sdxl_embedding(a1111, file_stem(name), vectors, sdxl_width_1)
    if unet is not None:
        written["unet"] = export_unet(folder, *unet)
    if lora is not None or text_lora is not None:
        written["lora"] = save_lora(folder / LORA_NAME, lora, text_encoder=text_lora)
    if lora is not None:
        (folder / "a1111" / "lora").mkdir(parents=True, exist_ok=True)
        written["lora_kohya"] = save_lora(
            folder / "a1111" / "lora" / f"{file_stem(name)}.safetensors", lora, kohya=True
        )
    if svdiff is not None:
        written["svdiff"] = save_svdiff(folder / SVDIFF_NAME, svdiff)
    if custom_diffusion is not None:
        written.update(save_custom_diffusion(folder, custom_diffusion))
    if xti is not None:
        written["xti"] = save_xti_embeds(folder / XTI_NAME, placeholder, *xti)
    if neti is not None:
        written["neti"] = save_neti_mapper(folder / NETI_NAME, placeholder, *neti)
    return written

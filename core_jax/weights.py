"""diffusers-format model folders <-> Flax params, with numpy and safetensors only.

Naming: a torch key `down_blocks.0.attentions.1.proj_in.weight` is the Flax path
`down_blocks_0/attentions_1/proj_in/kernel`: list indices join their container with `_`, and
`weight` becomes `kernel` (Linear: transposed; Conv: OIHW -> HWIO), `scale` (norms) or
`embedding` (tables) according to what the module declares. Every load is checked key for key and
shape for shape against the module's `eval_shape`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen import Module

from core_jax.errors import InputError
from core_jax.files import atomic_write_bytes
from core_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from core_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection
from core_jax.models.unet import UNet2DConditionModel, UNetConfig
from core_jax.models.vae import AutoencoderKL, VAEConfig
from core_jax.models.vit import ViTConfig, ViTModel

# Module lists in the references (`name.N` in torch, `name_N` here).
_LIST_CONTAINERS = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "layers", "to_out", "net",
})
# Buffers some checkpoints carry that are not parameters.
_IGNORED_KEYS = re.compile(r"(^|\.)position_ids$")
# Pre-0.14 diffusers VAE attention names.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}

Params = dict[str, Any]


def torch_key_to_path(key: str, legacy_names: bool = True) -> tuple[str, ...]:
    """`a.b.0.c.weight` -> (`a`, `b_0`, `c`, `weight`) (leaf name resolved later); with
    `legacy_names`, pre-0.14 VAE attention names become today's (`query` -> `to_q`)."""
    parts: list[str] = []
    for part in key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        elif legacy_names:
            parts.append(_LEGACY_ATTENTION.get(part, part).replace(".", "_"))
        else:
            parts.append(part)
    return tuple(parts)


def path_to_torch_key(path: tuple[str, ...]) -> str:
    parts = []
    for part in path[:-1]:
        match = re.fullmatch(r"(.+)_(\d+)", part)
        parts.append(f"{match[1]}.{match[2]}" if match and match[1] in _LIST_CONTAINERS else part)
    leaf = path[-1]
    parts.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
    return ".".join(parts)


def _to_flax(array: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    if leaf != "kernel":
        return array
    if array.ndim == 4 and target_ndim == 2:  # legacy VAE attention: Linear stored as 1x1 conv
        return np.transpose(array[:, :, 0, 0])
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    return np.transpose(array)


def _to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else np.transpose(array)
    return array


def convert_state_dict(state: dict[str, np.ndarray], expected: Params, what: str) -> Params:
    """torch-named arrays -> a Flax param tree shaped exactly like `expected` (a shape tree)."""
    expected_flat = traverse_util.flatten_dict(expected)
    by_prefix: dict[tuple[str, ...], dict[str, tuple[int, ...]]] = {}
    for path, leaf in expected_flat.items():
        by_prefix.setdefault(path[:-1], {})[path[-1]] = leaf.shape
    converted: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, array in state.items():
        if _IGNORED_KEYS.search(key):
            continue
        path = torch_key_to_path(key, legacy_names=False)
        if path[:-1] not in by_prefix:  # ViT's `attention.query` is literal, the VAE's legacy
            path = torch_key_to_path(key)
        prefix, name = path[:-1], path[-1]
        leaves = by_prefix.get(prefix, {})
        if name == "bias" or name in leaves:  # a parameter named as in torch (`cls_token`)
            leaf = name
        else:
            leaf = next((n for n in ("kernel", "scale", "embedding") if n in leaves), None)
        if leaf is None or leaf not in leaves:
            unexpected.append(key)
            continue
        value = _to_flax(np.asarray(array), leaf, len(leaves[leaf]))
        if value.shape != tuple(leaves[leaf]):
            raise InputError(
                f"{what}: {key} has shape {tuple(array.shape)}, the model config expects "
                f"{_to_torch(np.zeros(leaves[leaf]), leaf).shape}; does config.json match?"
            )
        converted[prefix + (leaf,)] = value
    missing = sorted("/".join(p) for p in expected_flat if p not in converted)
    if unexpected or missing:
        raise InputError(
            f"{what}: weights do not match the config "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
    return traverse_util.unflatten_dict(converted)


def params_to_state_dict(params: Params, key_prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params -> torch-named float arrays (the inverse of `convert_state_dict`)."""
    out = {}
    for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
        out[key_prefix + path_to_torch_key(path)] = np.ascontiguousarray(
            _to_torch(np.asarray(value, dtype=np.float32), path[-1])
        )
    return out


def _component_dir(folder: str | os.PathLike, component: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"model folder {folder} does not exist")
    if (folder / component / "config.json").is_file():
        return folder / component
    if (folder / "config.json").is_file():
        return folder
    raise InputError(f"{folder} has no {component}/config.json (is it a diffusers model folder?)")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            out[key] = f.get_tensor(key)
    return out


def _read_bf16_safe(path: Path) -> dict[str, np.ndarray]:
    """safetensors' numpy reader lacks bfloat16; fall back to JAX's reader for such files."""
    try:
        return _read_safetensors(path)
    except (TypeError, ValueError):
        from safetensors.flax import load_file

        return {k: np.asarray(v.astype(jnp.float32)) for k, v in load_file(str(path)).items()}


def read_weights(directory: Path, stem: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Read `<stem>.safetensors`, a sharded `<stem>.safetensors.index.json`, or (opt-in) `.bin`."""
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        return _read_bf16_safe(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, np.ndarray] = {}
        for shard in shards:
            state.update(_read_bf16_safe(directory / shard))
        return state
    candidates = sorted(directory.glob("*.safetensors"))
    if len(candidates) == 1:
        return _read_bf16_safe(candidates[0])
    pickled = sorted(directory.glob("*.bin"))
    if pickled:
        if not allow_pickle:
            raise InputError(
                f"{directory} has only pickled weights ({pickled[0].name}); pickles can run code "
                "when loaded. Convert them to safetensors, or if you trust the file set "
                "allow_pickle (--config.model.allow_pickle=True)"
            )
        import torch  # opt-in path only

        state = {}
        for file in pickled:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
            state.update({k: v.float().numpy() for k, v in loaded.items()})
        return state
    raise InputError(f"{directory} has no weights ({stem}.safetensors or a sharded index)")


def _load(
    folder: str | os.PathLike,
    component: str,
    make_module: Callable[[dict[str, Any]], Module],
    init_shapes: Callable[[Module], Params],
    allow_pickle: bool,
) -> tuple[Module, Params]:
    directory = _component_dir(folder, component)
    config = json.loads((directory / "config.json").read_text())
    try:
        module = make_module(config)
    except (TypeError, ValueError) as err:
        raise InputError(f"{directory / 'config.json'}: {err}") from err
    expected = init_shapes(module)
    state = read_weights(directory, _WEIGHT_FILES[component], allow_pickle)
    if component.startswith("text_encoder") and not any(k.startswith("text_model.") for k in state):
        state = {k if k.startswith("text_projection.") else f"text_model.{k}": v
                 for k, v in state.items()}
    params = convert_state_dict(state, expected, str(directory))
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.float32), params)
    return module, params


def text_encoder_shapes(module: CLIPTextModel | CLIPTextModelWithProjection) -> Params:
    ids = jnp.zeros((1, module.config.max_position_embeddings), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), ids)["params"]


def unet_shapes(module: UNet2DConditionModel) -> Params:
    inputs = module.config.example_inputs()
    return jax.eval_shape(lambda key: module.init(key, **inputs), jax.random.key(0))["params"]


def vae_shapes(module: AutoencoderKL) -> Params:
    size = 2 ** (len(module.config.block_out_channels) - 1)
    images = jnp.zeros((1, size, size, module.config.in_channels))
    return jax.eval_shape(module.init, jax.random.key(0), images)["params"]


def load_text_encoder(
    folder: str | os.PathLike, dtype: jnp.dtype = jnp.float32, allow_pickle: bool = False,
    pooling: str = "end_of_text",
) -> tuple[CLIPTextModel, Params]:
    """The CLIP text encoder of a diffusers folder (or a `text_encoder/` folder itself);
    `pooling` as `CLIPTextConfig.from_diffusers` takes it."""
    return _load(
        folder, "text_encoder",
        lambda cfg: CLIPTextModel(CLIPTextConfig.from_diffusers(cfg, pooling), dtype),
        text_encoder_shapes, allow_pickle,
    )


def load_text_encoder_2(
    folder: str | os.PathLike, dtype: jnp.dtype = jnp.float32, allow_pickle: bool = False,
    pooling: str = "end_of_text",
) -> tuple[CLIPTextModelWithProjection, Params]:
    """SDXL's second text encoder (`text_encoder_2/`, a `CLIPTextModelWithProjection`) of a
    diffusers folder, or such a folder itself; `pooling` as in `load_text_encoder`."""
    return _load(
        folder, "text_encoder_2",
        lambda cfg: CLIPTextModelWithProjection(CLIPTextConfig.from_diffusers(cfg, pooling),
                                                dtype),
        text_encoder_shapes, allow_pickle,
    )


def load_unet(
    folder: str | os.PathLike, dtype: jnp.dtype = jnp.float32, allow_pickle: bool = False
) -> tuple[UNet2DConditionModel, Params]:
    """The U-Net of a diffusers folder (or a `unet/` folder itself)."""
    return _load(
        folder, "unet", lambda cfg: UNet2DConditionModel(UNetConfig.from_diffusers(cfg), dtype),
        unet_shapes, allow_pickle,
    )


def load_vae(
    folder: str | os.PathLike, dtype: jnp.dtype = jnp.float32, allow_pickle: bool = False
) -> tuple[AutoencoderKL, Params]:
    """The VAE of a diffusers folder (or a `vae/` folder itself)."""
    return _load(
        folder, "vae", lambda cfg: AutoencoderKL(VAEConfig.from_diffusers(cfg), dtype),
        vae_shapes, allow_pickle,
    )


@dataclasses.dataclass
class SDXLModels:
    """The models of an SDXL diffusers folder; params keyed "text", "text_2", "unet", "vae"."""

    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    params: dict[str, Params]


def load_sdxl(
    folder: str | os.PathLike, dtype: jnp.dtype = jnp.float32, allow_pickle: bool = False,
    pooling: str = "end_of_text",
) -> SDXLModels:
    """Every model of an SDXL diffusers folder (`text_encoder/`, `text_encoder_2/`, `unet/`,
    `vae/`), checked to fit together: the U-Net's context is both encoders' widths and its
    added conditioning takes the second encoder's projection. `pooling`: where the second
    encoder's pooled embedding is read, "end_of_text" (A1111, ComfyUI) or "as_config"
    (diffusers: argmax of the ids for SDXL base's legacy `eos_token_id: 2`)."""
    folder = Path(folder)
    if not (folder / "text_encoder_2" / "config.json").is_file():
        raise InputError(f"{folder} has no text_encoder_2/config.json (is it an SDXL folder?)")
    text_encoder, text_params = load_text_encoder(folder, dtype, allow_pickle, pooling)
    text_encoder_2, text_2_params = load_text_encoder_2(folder, dtype, allow_pickle, pooling)
    unet, unet_params = load_unet(folder, dtype, allow_pickle)
    vae, vae_params = load_vae(folder, dtype, allow_pickle)
    widths = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    if unet.config.addition_embed_type != "text_time":
        raise InputError(f"{folder / 'unet'}: not an SDXL U-Net (addition_embed_type is not "
                         '"text_time")')
    if unet.config.cross_attention_dim != widths:
        raise InputError(
            f"{folder}: the U-Net's cross_attention_dim {unet.config.cross_attention_dim} is not "
            f"the two text encoders' widths together ({widths})"
        )
    return SDXLModels(
        text_encoder, text_encoder_2, unet, vae,
        {"text": text_params, "text_2": text_2_params, "unet": unet_params, "vae": vae_params},
    )


def transformers_folder(
    folder: str | os.PathLike, what: str, model_types: tuple[str, ...]
) -> Path:
    """`folder`, checked to be a transformers model folder whose config.json names one of
    `model_types`; InputError (one line) otherwise."""
    directory = Path(folder)
    if not (directory / "config.json").is_file():
        raise InputError(f"{what} model folder {directory} has no config.json")
    try:
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise InputError(f"{directory / 'config.json'} is not a readable JSON object") from err
    if model_type not in model_types:
        raise InputError(
            f"{directory} is not a {what} model folder: its config.json says model_type "
            f"{model_type!r}, expected {' or '.join(model_types)}"
        )
    return directory


def _transformers_config(directory: Path, read: Callable[[Path], Any]) -> Any:
    """transformers' own reading of config.json: it fills what an older or diffed file leaves
    out (sub-config defaults, legacy keys)."""
    try:
        return read(directory)
    except (OSError, TypeError, ValueError) as err:
        raise InputError(f"{directory / 'config.json'}: {err}") from err


def _convert_part(
    state: dict[str, np.ndarray], prefixes: tuple[str, ...], module: Module, sample: jax.Array,
    where: Path,
) -> Params:
    part = {k: v for k, v in state.items() if k.startswith(prefixes)}
    expected = jax.eval_shape(module.init, jax.random.key(0), sample)["params"]
    params = convert_state_dict(part, expected, str(where))
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.float32), params)


def load_clip(
    folder: str | os.PathLike, dtype: jnp.dtype = jnp.float32, allow_pickle: bool = False
) -> tuple[CLIPVisionModelWithProjection, Params, CLIPTextModelWithProjection, Params]:
    """Both towers of a transformers `CLIPModel` folder (openai/clip-vit-large-patch14, ...):
    (vision module, its params, text module, its params); `logit_scale` is not needed."""
    directory = transformers_folder(folder, "CLIP", ("clip",))
    from transformers import CLIPConfig

    config = _transformers_config(directory, CLIPConfig.from_pretrained)
    projection = {"projection_dim": config.projection_dim}  # the top-level one is what counts
    try:
        vision = CLIPVisionModelWithProjection(
            CLIPVisionConfig.from_dict({**config.vision_config.to_dict(), **projection}), dtype)
        text = CLIPTextModelWithProjection(
            CLIPTextConfig.from_diffusers({**config.text_config.to_dict(), **projection}), dtype)
    except (TypeError, ValueError) as err:
        raise InputError(f"{directory / 'config.json'}: {err}") from err
    state = read_weights(directory, "model", allow_pickle)
    size = vision.config.image_size
    vision_params = _convert_part(state, ("vision_model.", "visual_projection."), vision,
                                  jnp.zeros((1, size, size, 3)), directory)
    text_params = _convert_part(state, ("text_model.", "text_projection."), text,
                                jnp.zeros((1, 8), jnp.int32), directory)
    return vision, vision_params, text, text_params


def load_dino(
    folder: str | os.PathLike, dtype: jnp.dtype = jnp.float32, allow_pickle: bool = False
) -> tuple[ViTModel, Params]:
    """A transformers `ViTModel` (DINO, facebook/dino-vits16) or `Dinov2Model` folder. The ViT
    pooler and the mask token are skipped: the DINO score reads the class token."""
    directory = transformers_folder(folder, "DINO", ("vit", "dinov2"))
    from transformers import AutoConfig

    config = _transformers_config(directory, AutoConfig.from_pretrained)
    try:
        module = ViTModel(ViTConfig.from_dict(config.to_dict()), dtype)
    except (TypeError, ValueError) as err:
        raise InputError(f"{directory / 'config.json'}: {err}") from err
    state = read_weights(directory, "model", allow_pickle)
    state.pop("embeddings.mask_token", None)
    size = module.config.image_size
    return module, _convert_part(state, ("embeddings.", "encoder.", "layernorm."), module,
                                 jnp.zeros((1, size, size, 3)), directory)


def save_component(
    folder: str | os.PathLike, component: str, module: Module, params: Params
) -> Path:
    """Write `config.json` + safetensors that diffusers/transformers `from_pretrained` accept."""
    from safetensors.numpy import save

    directory = Path(folder)
    directory.mkdir(parents=True, exist_ok=True)
    state = params_to_state_dict(params)
    stem = _WEIGHT_FILES[component]
    atomic_write_bytes(directory / f"{stem}.safetensors",
                       lambda: save(state, metadata={"format": "pt"}))
    if isinstance(module, CLIPTextModelWithProjection):
        config = module.config.to_diffusers("CLIPTextModelWithProjection")
    else:
        config = module.config.to_diffusers()
    atomic_write_bytes(directory / "config.json", json.dumps(config, indent=2).encode())
    return directory


def save_unet(folder: str | os.PathLike, module: UNet2DConditionModel, params: Params) -> Path:
    return save_component(folder, "unet", module, params)


def save_text_encoder(folder: str | os.PathLike, module: CLIPTextModel, params: Params) -> Path:
    return save_component(folder, "text_encoder", module, params)


def save_text_encoder_2(
    folder: str | os.PathLike, module: CLIPTextModelWithProjection, params: Params
) -> Path:
    return save_component(folder, "text_encoder_2", module, params)


def save_vae(folder: str | os.PathLike, module: AutoencoderKL, params: Params) -> Path:
    return save_component(folder, "vae", module, params)

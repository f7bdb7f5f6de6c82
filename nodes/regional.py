"""Regional prompts in one pass: the rules, the conditioning made into one entry, and, per model call, which batch
rows carry the prompts and the mask of each attention call (the label mask of attention/regional.py).

The node joins the entries of a CONDITIONING: entries with a mask are regions, the others the base prompt. Their text
is concatenated ([base, region 1, ..., region R]) into one entry that carries a ``RegionalPrompts`` under
``REGIONS_KEY``. ComfyUI gives each entry a uuid when sampling starts; the patch's sampler wrapper maps those uuids to
the prompts (``prompts_by_uuid``), and each model call finds its rows from ``transformer_options["uuids"]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..attention.masks import RegionMask
from ..attention.regional import MAX_REGIONS, RegionalPrompt, TokenMap
from .families import CallPlacement, ModelCall, ModelFamily
from .settings import sigma_of

REGIONS_KEY = "efficient_attention_pop_regions"  # in a conditioning entry's dict, and in transformer_options


@dataclass(frozen=True)
class RegionRules:
    """Which steps and which layers restrict image to image, and how masks become token cells. Defaults from the
    published rules (docs/regional-prompts.md): Chen et al. 2024 restrict image to image in about the first third of
    the steps and mix the base prompt in at 0.1 to 0.3; DenseDiffusion modulates the first 30%; InvokeAI max-pools
    masks per UNet level so that small regions survive. On the proxy model, isolation 0.2 placed as many regions
    as 0.3 with about half the seam at their borders, hence 0.2.

    isolation: share of the steps, from the start, in which image tokens attend only to their own region's.
    base_weight: how strongly the base prompt speaks inside the regions (0: not at all, 1: as a region's own).
    isolate_every: in those steps, every n-th self-attention layer of a model call restricts (1: all).
    """

    isolation: float = 0.2
    base_weight: float = 0.3
    isolate_every: int = 1

    def __post_init__(self):
        if not 0.0 <= self.isolation <= 1.0 or not 0.0 <= self.base_weight <= 1.0 or self.isolate_every < 1:
            raise ValueError(f"isolation and base_weight must be in [0, 1] and isolate_every >= 1; got "
                             f"isolation={self.isolation}, base_weight={self.base_weight}, "
                             f"isolate_every={self.isolate_every}")


POOLING = {"unet": "max", "dit": "area"}  # UNet levels halve the latent: any pixel inside keeps small regions


@dataclass(frozen=True, eq=False)
class RegionalPrompts:
    """What the joined conditioning entry carries: the prompts' token counts and masks, and the rules."""

    prompt: RegionalPrompt
    rules: RegionRules
    mask_size: Tuple[int, int]  # (H, W) of the masks, for the aspect-ratio check against the latent


# ---- the node: conditioning entries -> one entry ----
REGION_KEYS = ("mask", "mask_strength", "set_area_to_bounds", "strength")  # what makes an entry a region
MERGED_KEYS = {*REGION_KEYS, "pooled_output"}  # may differ between entries: the joined entry keeps the base's
TEXT_ALIGNED_KEYS = ("attention_mask",)  # (B, tokens) per entry, joined like the text (LTXV's T5 padding mask)


@dataclass
class Joined:
    """The node's answer: ``conditioning`` (one entry, or the input unchanged with ``fallback`` saying why), and
    ``notes``: warnings about what the one pass does with the input."""

    conditioning: list
    fallback: Optional[str] = None
    notes: List[str] = field(default_factory=list)


def join_conditioning(conditioning, rules: RegionRules, pad_left_to: Optional[int] = None) -> Joined:
    """Entries with a mask become regions, the others the base prompt; see the module docstring. ``pad_left_to``:
    each prompt is first left-padded with zeros to this many tokens, as the model pads a prompt alone (Flux 2)."""
    entries = [(_pad_left(text, pad_left_to), dict(options)) for text, options in conditioning]
    if any("area" in options for _, options in entries):
        return Joined(conditioning, "Conditioning (Set Area) entries are served by ComfyUI's own per-area passes "
                                    "(convert the area to a mask to use one pass)")
    regions = [(text, options) for text, options in entries if options.get("mask") is not None]
    bases = [(text, options) for text, options in entries if options.get("mask") is None]
    if not regions:
        return Joined(conditioning, "the conditioning has no entry with a mask, so there is no region: it is passed "
                                    "on unchanged")
    if len(regions) > MAX_REGIONS:
        return Joined(conditioning, f"{len(regions)} regions; one pass serves up to {MAX_REGIONS}")
    problem = _mismatch(entries)
    if problem:
        return Joined(conditioning, problem)
    notes = []
    if any(float(options.get("strength", 1.0)) != 1.0 or float(options.get("mask_strength", 1.0)) != 1.0
           for _, options in entries):
        notes.append("strength and mask_strength are not used by one pass (a mask is inside where it is at least "
                     "0.5); ComfyUI's own way weights the prompts by them")
    masks = _region_masks([options["mask"] for _, options in regions])
    covered = masks.amax(dim=(0, 1)) >= 0.5
    if not bases and not bool(covered.all()):
        notes.append(f"{int((~covered).sum())} of {covered.numel()} mask pixels lie in no region and there is no "
                     "base prompt (an entry without a mask): there the image follows no prompt")
    segments = [sum(text.shape[1] for text, _ in bases)] + [text.shape[1] for text, _ in regions]
    prompts = RegionalPrompts(RegionalPrompt(segments, masks, rules.base_weight), rules, tuple(masks.shape[-2:]))
    kept = dict((bases or regions)[0][1])  # pooled output, ControlNet and the like: the base prompt's
    for name in REGION_KEYS:
        kept.pop(name, None)
    kept[REGIONS_KEY] = prompts
    ordered = bases + regions
    for name in TEXT_ALIGNED_KEYS:
        if name in kept:
            kept[name] = torch.cat([options[name] for _, options in ordered], dim=1)
    text = torch.cat([text for text, _ in ordered], dim=1)
    return Joined([[text, kept]], None, notes)


def _pad_left(text: torch.Tensor, length: Optional[int]) -> torch.Tensor:
    if not length or text.shape[1] >= length:
        return text
    return F.pad(text, (0, 0, length - text.shape[1], 0))


def text_padding(model) -> Optional[int]:
    """The length the model left-pads a prompt to before its diffusion model sees it (Flux 2: 512), read by giving
    its ``extra_conds`` a one-token prompt; None where it pads nothing or cannot be asked."""
    base = model.model
    unet = getattr(base, "model_config", None)
    width = (getattr(unet, "unet_config", {}) or {}).get("context_in_dim")
    channels = getattr(getattr(base, "latent_format", None), "latent_channels", None)
    if not isinstance(width, int) or not isinstance(channels, int):
        return None
    marker = torch.ones(1, 1, width)
    try:
        out = base.extra_conds(cross_attn=marker, device=torch.device("cpu"), noise=torch.zeros(1, channels, 8, 8))
    except Exception:  # noqa: BLE001 - a model whose extra_conds wants more: no padding known, none applied
        return None
    text = getattr(out.get("c_crossattn"), "cond", None)
    if not isinstance(text, torch.Tensor) or text.ndim != 3 or text.shape[1] <= 1:
        return None
    padded_left = bool(text[0, -1].eq(1).all()) and not bool(text[0, :-1].any())
    return text.shape[1] if padded_left else None


def _mismatch(entries) -> Optional[str]:
    """Why the entries cannot be joined into one (None: they can): text of other widths or batches, or extras that
    differ between entries (ControlNet, timestep ranges, hooks, text attention masks, reference latents, ...)."""
    first_text, first = entries[0]
    for name in TEXT_ALIGNED_KEYS:
        values = [(text, options.get(name)) for text, options in entries]
        if any(v is not None for _, v in values) and not all(
                isinstance(v, torch.Tensor) and v.ndim == 2 and v.shape == text.shape[:2] for text, v in values):
            return f"the entries' {name!r} does not cover each one's text, so it cannot be joined"
    for text, options in entries[1:]:
        if text.shape[0] != first_text.shape[0] or text.shape[2:] != first_text.shape[2:]:
            return (f"prompts of different text encoders or batches ({tuple(first_text.shape)} and "
                    f"{tuple(text.shape)}) cannot share one pass")
        for name in (set(first) | set(options)) - MERGED_KEYS - set(TEXT_ALIGNED_KEYS):
            a, b = first.get(name), options.get(name)
            if a is not b and not (_plain(a) and _plain(b) and a == b):
                return (f"the entries differ in {name!r} (e.g. a ControlNet, a timestep range or a text attention "
                        "mask on some of them only), which one pass cannot keep per region")
    return None


def _plain(value) -> bool:
    return isinstance(value, (int, float, str, bool, tuple, type(None)))


def _region_masks(masks) -> torch.Tensor:
    """(R, Fm, H, W) float from the regions' MASKs ((H, W) or (B, H, W); a batch is a mask per video frame), at the
    largest mask's size."""
    masks = [m[None] if m.ndim == 2 else m for m in masks]
    height = max(m.shape[-2] for m in masks)
    width = max(m.shape[-1] for m in masks)
    frames = max(m.shape[0] for m in masks)
    resized = []
    for m in masks:
        m = m.detach().float().cpu()
        if m.shape[-2:] != (height, width) or m.shape[0] != frames:
            size = (frames if m.shape[0] > 1 else 1, height, width)
            m = F.interpolate(m[None, None], size=size, mode="nearest")[0, 0]
        resized.append(m.expand(frames, -1, -1))
    return torch.stack(resized)


# ---- one model call ----
class RegionalCall:
    """The regional prompts in one model call: the batch rows that carry them, whether this step isolates regions,
    and each attention call's mask (labels cached per run, in ``cache``)."""

    def __init__(self, prompts: RegionalPrompts, rows: torch.Tensor, isolate: bool, cache: dict):
        self.prompts = prompts
        self.rows = rows
        self.isolate = isolate
        self.cache = cache
        self.image_self_calls = 0

    def region_mask(self, family: ModelFamily, placement: CallPlacement, model_call: ModelCall, query_tokens: int,
                    key_tokens: int, batch: int, device) -> Tuple[Optional[RegionMask], Optional[str]]:
        """(the mask of one attention call, or None where it allows everything; why the call cannot be served with
        the prompts' regions, or None)."""
        sides = self._sides(family, placement, model_call, query_tokens, key_tokens)
        if isinstance(sides, str):
            return None, sides
        if sides is None:
            return None, None
        if batch != self.rows.shape[0]:
            return None, f"an attention batch of {batch} rows in a model call of {self.rows.shape[0]}"
        queries, keys = sides
        isolate = self.isolate
        if placement.self_attention and queries.image is not None and keys.image is not None:
            isolate = isolate and self.image_self_calls % self.prompts.rules.isolate_every == 0
            self.image_self_calls += 1
        key = (queries, keys, isolate, batch, str(device))
        if key not in self.cache:
            pooling = POOLING["unet" if family.is_unet else "dit"]
            self.cache[key] = self.prompts.prompt.region_mask(queries, keys, isolate, self.rows, pooling, device)
        return self.cache[key], None

    def _sides(self, family, placement, model_call, query_tokens, key_tokens):
        """(queries, keys) TokenMaps; None: a call the prompts do not concern; a string: why it cannot be placed."""
        text = model_call.text_tokens or 0
        if text % self.prompts.prompt.tokens:
            return f"{text} text tokens are not the {self.prompts.prompt.tokens} tokens of the prompts, tiled"
        if placement.self_attention:
            layout = placement.key
            if layout is None:
                if query_tokens == key_tokens == text:  # the text alone (a text block)
                    side = TokenMap(text, None, 0, text)
                    return side, side
                return placement.problem or None
            if layout.before == 0 and layout.after == 0:
                side = TokenMap(key_tokens, layout)
                return (TokenMap(query_tokens, placement.query), side) if placement.query is not None else \
                    "queries whose places are not known (merged, e.g. by ToMe)"
            start = _text_start(family, layout, text, key_tokens)
            if start is not None and placement.query == layout:
                side = TokenMap(key_tokens, layout, start, text)
                return side, side
            return f"{key_tokens} tokens whose text this pack cannot place for regional prompts"
        if key_tokens != text:
            return None  # cross-attention to other tokens (CLIP image features, audio)
        if placement.query is None or placement.query.before or placement.query.after:
            return f"cross-attention queries ({query_tokens} tokens) that are not the image grid"
        return TokenMap(query_tokens, placement.query), TokenMap(key_tokens, None, 0, key_tokens)


def _text_start(family: ModelFamily, layout, text: int, tokens: int) -> Optional[int]:
    """Where a joint call's text starts: just before the image after the family's leading tokens (AuraFlow's
    registers), or at the end after the image and its references; None where the counts do not say so."""
    if family.others_first and layout.before == family.leading_tokens + text:
        return family.leading_tokens
    if family.text_after_image and layout.after >= text:
        return tokens - text
    return None


def restart_text_positions(args: dict) -> dict:
    """A ``post_input`` patch: in the rows of regional prompts, each prompt's text positions restart where the text
    starts, as if it were alone (txt_ids (B, L, axes), every axis counting along the text)."""
    regional = args["transformer_options"].get(REGIONS_KEY)
    ids = args.get("txt_ids")
    if regional is None or not isinstance(ids, torch.Tensor) or ids.ndim != 3 or ids.shape[0] != len(regional.rows):
        return args
    places = regional.prompts.prompt.text_places(ids.shape[1]).to(ids)
    counting = (ids[:1, -1] != ids[:1, 0]).to(ids)  # (1, axes): the axes that count along the text (Flux 2: one)
    restarted = ids[:, :1] + places[None, :, None] * counting[:, None]
    return dict(args, txt_ids=torch.where(regional.rows.to(ids.device)[:, None, None], restarted, ids))


def regional_call(prompts_by_uuid: Dict[object, RegionalPrompts], options: dict, latent: torch.Tensor,
                  threshold: Dict[int, float], cache: dict) -> Tuple[Optional[RegionalCall], Optional[str]]:
    """The regional prompts of one model call from its ``uuids`` (None where none of its conds carries them), and
    why some could not be served (several different regional conditionings batched together)."""
    uuids = list(options.get("uuids") or ())
    found = [prompts_by_uuid.get(uuid) for uuid in uuids]
    kinds = {id(p): p for p in found if p is not None}
    if not kinds:
        return None, None
    prompts = found[next(i for i, p in enumerate(found) if p is not None)]
    per_chunk = latent.shape[0] // max(1, len(uuids))
    rows = torch.tensor([found[i // per_chunk] is prompts for i in range(latent.shape[0])])
    problem = None if len(kinds) == 1 else "two different regional conditionings in one batch: the second runs " \
                                           "with its prompts mixed"
    return RegionalCall(prompts, rows, _isolates(prompts.rules, options, threshold), cache), problem


def _isolates(rules: RegionRules, options: dict, threshold: Dict[int, float]) -> bool:
    """Whether this model call is in the isolation share of the schedule: its sigma above the sigma that ends the
    first ``isolation`` share of the sampler's steps (found once per run; one host read per model call)."""
    if rules.isolation >= 1.0:
        return True
    if rules.isolation <= 0.0:
        return False
    if id(rules) not in threshold:
        schedule = options.get("sample_sigmas")
        if not isinstance(schedule, torch.Tensor) or schedule.numel() < 2:
            return False
        steps = schedule.numel() - 1
        threshold[id(rules)] = float(schedule[round(rules.isolation * steps)])
    sigma = sigma_of(options.get("sigmas"))
    return sigma is not None and sigma > threshold[id(rules)]

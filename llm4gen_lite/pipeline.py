"""`LLM4GenPipeline`: text -> image with an adapter-conditioned UNet, guidance and attention capture.

A diffusers `DiffusionPipeline` with components `unet`, `scheduler`, `adapter` and an optional
`vae` (latent models such as SD1.5; pixel-space lite models have none). The two frozen text
encoders are plain attributes, not serialised: `save_pretrained` writes their load specs to
`encoders.json`, and `from_pretrained` re-creates them with `llm4gen_lite.encoders.load_encoder`
(or takes them as `clip_encoder=` / `llm_encoder=`). Precomputed features can replace prompts.

Guidance stacks every branch into one UNet call per step. With `llm_guidance_scale=None` it is
ordinary classifier-free guidance, `p(∅) + s·(p(c) − p(∅))`; with a value it is LLM-guided:
`p(∅) + s·(p(c_clip) − p(∅)) + s_llm·(p(c) − p(c_clip))`, where `c_clip` is the prompt's
conditioning with the LLM branch dropped. `p` is whatever the UNet predicts (ε or v): the
combination is linear, so it applies to both.
"""
from __future__ import annotations

import importlib
import inspect
import os
import shutil
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .adapter import Conditioning, ConditioningAdapter
from .attention import AttentionMaps, capture_cross_attention
from .encoders import PromptTruncatedWarning, TextEncoder, TextFeatures, check_prompts, load_encoder
from .io import atomic_write_json, read_json, safetensors_shapes
from .unet import PixelShuffleAutoencoder, from_model_space

ENCODERS_FILE = "encoders.json"


@dataclass
class LLM4GenPipelineOutput(BaseOutput):
    """Sampled images and, when asked for, their cross-attention maps."""

    images: Any  # list of PIL images, np.ndarray [batch, H, W, 3] or torch.Tensor [batch, 3, H, W], in [0, 1]
    attention: AttentionMaps | None = None  # maps of the prompt (fused) branch, step-averaged


def _encoder_record(encoder: TextEncoder) -> dict[str, Any]:
    """What `encoders.json` keeps of an encoder: its `load_encoder` arguments, identity and dim.

    The load spec is the encoder's `load_spec` (set by `load_encoder` to the JSON-able arguments
    that rebuild it); an encoder built another way has none, is recorded with `spec: null` and must
    then be passed to `from_pretrained`.
    """
    spec = getattr(encoder, "load_spec", None)
    if spec is None:
        warnings.warn(
            f"encoder {encoder.identity} has no load_spec; the saved pipeline records only its identity, "
            "so pass it to LLM4GenPipeline.from_pretrained when loading"
        )
    return {"spec": None if spec is None else dict(spec), "identity": encoder.identity, "dim": encoder.dim}


def _check_dims(
    unet: dict[str, Any],
    adapter: dict[str, Any],
    vae: dict[str, Any] | None,
    clip_dim: int | None,
    llm_dim: int | None,
    where: dict[str, str],
) -> None:
    """Raise a ValueError naming both sides when component configs do not fit together.

    `where` names the source of each config (a file, or `<name>.config`) for the message.
    """
    width = "cross_attention_dim"
    pairs = [("adapter", width, adapter[width], "unet", width, unet[width])]
    if vae is not None:
        pairs.append(("vae", "latent_channels", vae["latent_channels"], "unet", "in_channels", unet["in_channels"]))
    elif unet["in_channels"] != 3:
        raise ValueError(
            f"{where['unet']} says in_channels={unet['in_channels']}: a latent-space UNet, but the pipeline "
            "has no vae; pass the VAE it was trained with (pixel-space UNets take in_channels=3)"
        )
    if clip_dim is not None and adapter["variant"] != "llm":
        pairs.append(("clip_encoder", "dim", clip_dim, "adapter", "clip_dim", adapter["clip_dim"]))
    if llm_dim is not None and adapter["variant"] != "clip":
        pairs.append(("llm_encoder", "dim", llm_dim, "adapter", "llm_dim", adapter["llm_dim"]))
    for a, a_key, a_val, b, b_key, b_val in pairs:
        if a_val != b_val:
            raise ValueError(
                f"dimension mismatch: {a_key}={a_val} in {where[a]} but {b_key}={b_val} in {where[b]}; "
                f"the {a} and the {b} were not built for each other"
            )


def _check_weights(component: Path, library_class: list[str], config: dict[str, Any], variant: str | None) -> None:
    """Raise a ValueError naming the weights file when its tensors do not fit the component's config.

    The expected names and shapes come from building the component from `config.json` on the meta
    device; the file's come from its safetensors header. Components of other libraries and
    sharded weights are left to diffusers.
    """
    library, class_name = library_class
    file = component / f"diffusion_pytorch_model{'.' + variant if variant else ''}.safetensors"
    if not file.is_file() or not (library == "diffusers" or library.split(".")[0] == "llm4gen_lite"):
        return
    module_class = getattr(importlib.import_module(library), class_name, None)
    if module_class is None or not hasattr(module_class, "from_config"):
        return
    with init_empty_weights():
        expected = {k: tuple(v.shape) for k, v in module_class.from_config(config).state_dict().items()}
    found = safetensors_shapes(file)
    kinds = {
        "of another shape": [
            f"{k} {found[k]} (config.json needs {expected[k]})"
            for k in sorted(expected.keys() & found.keys()) if found[k] != expected[k]
        ],
        "missing": sorted(expected.keys() - found.keys()),
        "unexpected": sorted(found.keys() - expected.keys()),
    }
    if any(kinds.values()):
        details = "; ".join(
            f"{len(names)} {kind}: {', '.join(names[:3])}{', …' if len(names) > 3 else ''}"
            for kind, names in kinds.items() if names
        )
        raise ValueError(
            f"{file} does not fit {component / 'config.json'} ({details}): the weights belong to another "
            "variant or size; save the pipeline again or restore its own files"
        )


def _prompt_list(prompt: str | list[str]) -> list[str]:
    """A prompt or a list of prompts as a validated, non-empty list of strings."""
    return check_prompts([prompt] if isinstance(prompt, str) else prompt)


def saved_pipeline_dir(path: str | os.PathLike) -> Path:
    """The saved pipeline of `path`: the folder itself, or a training run's `pipeline/`."""
    p = Path(path)
    for candidate in (p, p / "pipeline"):
        if (candidate / "model_index.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no saved pipeline here (expected model_index.json in it or in its pipeline/)")


class LLM4GenPipeline(DiffusionPipeline):
    """Text-to-image sampling for every conditioning variant (`clip`, `llm`, `concat`, `cam`)."""

    _optional_components = ["vae"]
    model_cpu_offload_seq = "adapter->unet->vae"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        adapter: ConditioningAdapter,
        vae: AutoencoderKL | PixelShuffleAutoencoder | None = None,
        clip_encoder: TextEncoder | None = None,
        llm_encoder: TextEncoder | None = None,
    ) -> None:
        super().__init__()
        _check_dims(
            dict(unet.config),
            dict(adapter.config),
            None if vae is None else dict(vae.config),
            getattr(clip_encoder, "dim", None),
            getattr(llm_encoder, "dim", None),
            {"unet": "unet.config", "adapter": "adapter.config", "vae": "vae.config",
             "clip_encoder": "clip_encoder.dim", "llm_encoder": "llm_encoder.dim"},
        )
        self.register_modules(unet=unet, scheduler=scheduler, adapter=adapter, vae=vae)
        self.clip_encoder = clip_encoder  # frozen TextEncoder (CLIP role); not serialised, see encoders.json
        self.llm_encoder = llm_encoder  # frozen TextEncoder (LLM); not serialised, see encoders.json

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save unet/scheduler/adapter(/vae) as safetensors + JSON and the encoders' load specs."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("LLM4GenPipeline saves only safetensors; drop safe_serialization=False")
        # built under a temporary sibling and swapped in, so a failed save keeps the previous pipeline
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            super().save_pretrained(tmp, safe_serialization=True, **kwargs)
            records = {
                role: None if encoder is None else _encoder_record(encoder)
                for role, encoder in (("clip", self.clip_encoder), ("llm", self.llm_encoder))
            }
            atomic_write_json(tmp / ENCODERS_FILE, records)
            if target.exists():
                os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                if old.exists():
                    os.replace(old, target)
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        clip_encoder: TextEncoder | None = None,
        llm_encoder: TextEncoder | None = None,
        load_encoders: bool = True,
        **kwargs: Any,
    ) -> LLM4GenPipeline:
        """Load a saved pipeline folder (safetensors only) and its encoders.

        Encoders passed here win (with a warning when their identity differs from the saved one);
        otherwise, with `load_encoders`, those recorded in `encoders.json` are rebuilt with
        `llm4gen_lite.encoders.load_encoder`. Component dimensions are checked against each other
        from the config files before any weights are read.
        """
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such pipeline folder (LLM4GenPipeline loads local folders only)")
        if kwargs.get("use_safetensors") is False:
            raise ValueError("LLM4GenPipeline loads only safetensors; drop use_safetensors=False")
        index = read_json(folder / "model_index.json")
        configs: dict[str, dict[str, Any] | None] = {}
        for name in ("unet", "adapter", "vae"):
            if name in kwargs:
                configs[name] = None if kwargs[name] is None else dict(kwargs[name].config)
            elif index.get(name, [None])[0] is not None:
                configs[name] = read_json(folder / name / "config.json")
            else:
                configs[name] = None
        records_file = folder / ENCODERS_FILE
        records = read_json(records_file) if records_file.is_file() else {}
        encoders = {"clip": clip_encoder, "llm": llm_encoder}
        for role, encoder in encoders.items():
            record = records.get(role)
            if encoder is not None and record is not None and encoder.identity != record["identity"]:
                warnings.warn(
                    f"the {role}_encoder passed in ({encoder.identity}) differs from the one this pipeline "
                    f"was saved with ({record['identity']}, {records_file}); its features may not fit the adapter"
                )
        where = {name: str(folder / name / "config.json") for name in ("unet", "adapter", "vae")}
        for role, encoder in encoders.items():
            where[f"{role}_encoder"] = f"the {role}_encoder passed in" if encoder is not None else str(records_file)
        _check_dims(
            configs["unet"],
            configs["adapter"],
            configs["vae"],
            *(
                encoder.dim if encoder is not None else (records.get(role) or {}).get("dim")
                for role, encoder in encoders.items()
            ),
            where,
        )
        for name in ("unet", "adapter", "vae"):
            if name not in kwargs and configs[name] is not None:
                _check_weights(folder / name, index[name], configs[name], kwargs.get("variant"))
        if load_encoders:
            for role, encoder in encoders.items():
                record = records.get(role)
                if encoder is not None or record is None:
                    continue
                if record["spec"] is None:
                    raise ValueError(
                        f"{records_file} records the {role} encoder {record['identity']} without a load spec; "
                        f"pass it as {role}_encoder=..., or load_encoders=False to sample from precomputed features"
                    )
                encoders[role] = load_encoder(**record["spec"])
        kwargs["use_safetensors"] = True
        return super().from_pretrained(
            str(folder), clip_encoder=encoders["clip"], llm_encoder=encoders["llm"], **kwargs
        )

    # ------------------------------------------------------------------ conditioning

    def _features(
        self, prompts: list[str] | None, clip: TextFeatures | None, llm: TextFeatures | None, what: str
    ) -> tuple[TextFeatures | None, TextFeatures | None]:
        """Features of both roles the adapter reads, encoded from `prompts` unless given."""
        out = []
        for role, given, encoder, needed in (
            ("clip", clip, self.clip_encoder, self.adapter.uses_clip),
            ("llm", llm, self.llm_encoder, self.adapter.uses_llm),
        ):
            if not needed:
                out.append(None)
                continue
            if given is None:
                if prompts is None:
                    raise ValueError(f"{what}: pass prompts or {role}_features")
                if encoder is None:
                    raise ValueError(
                        f"{what}: the {self.adapter.variant!r} adapter needs {role} features but the pipeline "
                        f"has no {role}_encoder; attach one or pass {role}_features"
                    )
                given = encoder.encode(prompts)  # the encoder warns about prompts it truncates
            elif any(given.truncated):
                cut = [i for i, t in enumerate(given.truncated) if t]
                warnings.warn(
                    f"{what}: the precomputed {role} features of prompt(s) {cut} were truncated at the "
                    "encoder's max_length when they were encoded",
                    PromptTruncatedWarning,
                )
            out.append(given)
        return out[0], out[1]

    def _condition(
        self, clip: TextFeatures | None, llm: TextFeatures | None, batch: int, device: torch.device,
        drop_llm: bool = False,
    ) -> Conditioning:
        """Run the adapter on features, broadcasting a batch of one to `batch` rows."""
        dtype = self.adapter.dtype

        def prepare(f: TextFeatures | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            if f is None:
                return None, None
            states, mask = f.features.to(device, dtype), f.mask.to(device)
            if states.shape[0] == 1 and batch > 1:
                states, mask = states.expand(batch, -1, -1), mask.expand(batch, -1)
            if states.shape[0] != batch:
                raise ValueError(f"features have batch {states.shape[0]} but {batch} prompts are being sampled")
            return states, mask

        clip_states, clip_mask = prepare(clip)
        llm_states, llm_mask = prepare(llm)
        drop = torch.full((batch,), drop_llm, dtype=torch.bool, device=device)
        return self.adapter(clip_states, clip_mask, llm_states, llm_mask, drop_llm=drop)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        llm_guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_attention: bool = False,
        attention_layers: list[str] | None = None,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        clip_features: TextFeatures | None = None,
        llm_features: TextFeatures | None = None,
        negative_clip_features: TextFeatures | None = None,
        negative_llm_features: TextFeatures | None = None,
    ) -> LLM4GenPipelineOutput:
        """Sample images.

        Args:
            prompt: a prompt or a list of prompts; or None when `clip_features`/`llm_features` are given.
            negative_prompt: the unconditional text (default `""`, the null condition), one or one per prompt.
            num_inference_steps: denoising steps of the scheduler.
            guidance_scale: classifier-free guidance scale `s` (1 = no guidance).
            llm_guidance_scale: `s_llm` of LLM-guided sampling; None = `s` (plain CFG, two branches).
            generator: torch generator(s) for the initial noise (and stochastic schedulers).
            output_type: "pil", "np" (`[batch, H, W, 3]`) or "pt" (`[batch, 3, H, W]`), values in [0, 1].
            return_attention: also return step-averaged cross-attention maps of the prompt branch.
            attention_layers: cross-attention layer names or prefixes to capture (None = all).
            num_images_per_prompt: images per prompt.
            latents: initial noise `[batch, channels, size, size]` instead of drawing it.
            clip_features, llm_features: precomputed features of the prompts (`TextFeatures`).
            negative_clip_features, negative_llm_features: precomputed features of the negative prompt.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"unknown output_type {output_type!r}; use 'pil', 'np' or 'pt'")
        if num_inference_steps < 1 or num_images_per_prompt < 1:
            raise ValueError("num_inference_steps and num_images_per_prompt must be at least 1")
        if prompt is not None and (clip_features is not None or llm_features is not None):
            raise ValueError("pass either prompt or clip_features/llm_features, not both")
        prompts = None if prompt is None else _prompt_list(prompt)
        clip, llm = self._features(prompts, clip_features, llm_features, "prompt")
        batch = len(prompts) if prompts is not None else next(f for f in (clip, llm) if f is not None).features.shape[0]

        if negative_prompt is not None and (negative_clip_features is not None or negative_llm_features is not None):
            raise ValueError("pass either negative_prompt or negative_*_features, not both")
        plain_cfg = llm_guidance_scale is None
        device = self._execution_device  # diffusers derives it from every component: look it up once
        branches = []
        if not (plain_cfg and guidance_scale == 1.0):  # s = 1 without LLM guidance needs no null branch
            negatives = None
            if negative_clip_features is None and negative_llm_features is None:
                negatives = _prompt_list("" if negative_prompt is None else negative_prompt)
                if len(negatives) not in (1, batch):
                    raise ValueError(
                        f"negative_prompt has {len(negatives)} entries for {batch} prompts; pass 1 or {batch}"
                    )
            neg_clip, neg_llm = self._features(
                negatives, negative_clip_features, negative_llm_features, "negative_prompt"
            )
            branches.append(self._condition(neg_clip, neg_llm, batch, device))
            if not plain_cfg:
                branches.append(self._condition(clip, llm, batch, device, drop_llm=True))
        branches.append(self._condition(clip, llm, batch, device))
        context = Conditioning.cat([b.repeat(num_images_per_prompt) for b in branches])

        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        shape = (batch * num_images_per_prompt, cfg.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {list(shape)}, got {list(latents.shape)}")
        latents = latents.to(device, self.unet.dtype) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        stochastic = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if stochastic else {}
        n = len(branches)
        capture = (
            capture_cross_attention(self.unet, attention_layers, mode="mean") if return_attention else nullcontext()
        )
        unet_kwargs = context.unet_kwargs()
        with capture as store:
            for t in self.progress_bar(self.scheduler.timesteps):
                model_in = self.scheduler.scale_model_input(torch.cat([latents] * n), t)
                pred = self.unet(model_in, t, **unet_kwargs).sample
                parts = pred.chunk(n)
                if n == 2:
                    pred = parts[0] + guidance_scale * (parts[1] - parts[0])
                elif n == 3:
                    pred = (
                        parts[0]
                        + guidance_scale * (parts[1] - parts[0])
                        + llm_guidance_scale * (parts[2] - parts[1])
                    )
                latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample

        images = (from_model_space(latents, self.vae) + 1) / 2
        attention = None
        if store is not None:
            rows = slice((n - 1) * shape[0], n * shape[0])  # the prompt (fused) branch is last
            attention = AttentionMaps(
                maps={layer: store.get(layer)[rows] for layer in store.layers},
                mask=context.mask[rows],
                clip_tokens=context.clip_tokens,
                llm_tokens=context.llm_tokens,
            )
        return LLM4GenPipelineOutput(images=self._to_output(images, output_type), attention=attention)

    def _to_output(self, images: torch.Tensor, output_type: str) -> Any:
        """`[batch, 3, H, W]` in [0, 1] -> the requested output type."""
        if output_type == "pt":
            return images.float().cpu()
        array = images.float().cpu().permute(0, 2, 3, 1).numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)

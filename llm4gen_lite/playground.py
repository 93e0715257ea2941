"""Side-by-side sampling for the interactive playground, usable with or without widgets.

`compare(pipes, prompt, ...)` samples every pipeline with the same seed and settings and returns a
figure: each pipeline's image, and when `word` is given, where that word's tokens attend (CLIP-role
and LLM tokens separately). `playground(pipes)` wraps it in ipywidgets controls; the function
itself needs no front end, so every setting is reachable from plain code too.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from .encoders import token_indices_for_span
from .viz import to_display_image


def compare(pipes: dict[str, Any], prompt: str, steps: int = 25, guidance_scale: float = 3.0,
            llm_guidance_scale: float | None = None, seed: int = 0, word: str | None = None) -> Figure:
    """One row per pipeline: the image, then the attention map of `word` per token branch."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("type a prompt, e.g. 'a red circle left of a blue square'")
    start = prompt.find(word) if word else -1
    if word and start < 0:
        raise ValueError(f"the word {word!r} does not occur in the prompt {prompt!r}")
    rows = []
    for name, pipe in pipes.items():
        s_llm = llm_guidance_scale if pipe.adapter.uses_llm else None
        res = pipe([prompt], num_inference_steps=steps, guidance_scale=guidance_scale, llm_guidance_scale=s_llm,
                   generator=torch.Generator().manual_seed(seed), output_type="np", return_attention=bool(word))
        panels = {}
        if word:
            att = res.attention
            if att.clip_tokens:
                clip_pos = token_indices_for_span(pipe.clip_encoder.encode([prompt]).offsets[0], start, start + len(word))
                panels[f"CLIP '{word}'"] = att.token_map(0, clip_pos)
            if att.llm_tokens:
                llm_pos = token_indices_for_span(pipe.llm_encoder.encode([prompt]).offsets[0], start, start + len(word))
                panels[f"LLM '{word}'"] = att.token_map(0, [att.clip_tokens + i for i in llm_pos])
        rows.append((name, res.images[0], panels))
    ncols = 1 + max(len(p) for _, _, p in rows)
    fig = Figure(figsize=(2.0 * ncols, 2.1 * len(rows)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), ncols))
    for r, (name, image, panels) in enumerate(rows):
        img = to_display_image(image)
        axes[r, 0].imshow(img, interpolation="nearest")
        axes[r, 0].set_title(name, fontsize=8)
        for c, (label, amap) in enumerate(panels.items(), start=1):
            axes[r, c].imshow(amap.cpu().numpy(), cmap="magma", interpolation="bilinear")
            axes[r, c].set_title(label, fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(prompt, fontsize=8)
    return fig


def playground(pipes: dict[str, Any], prompt: str = "a red circle left of a blue square", word: str = "red"):
    """ipywidgets controls (prompt, word, steps, guidance, s_llm, seed) around `compare`; returns the
    widget box. The first figure is drawn at once, so it also runs without a front end."""
    import ipywidgets as w
    from IPython.display import display

    controls = {
        "prompt": w.Text(value=prompt, description="prompt", layout=w.Layout(width="95%")),
        "word": w.Text(value=word, description="attend to"),
        "steps": w.IntSlider(value=25, min=2, max=50, description="steps"),
        "guidance_scale": w.FloatSlider(value=3.0, min=0.0, max=10.0, step=0.5, description="guidance s"),
        "llm_guidance_scale": w.FloatSlider(value=3.0, min=0.0, max=10.0, step=0.5, description="s_llm"),
        "seed": w.IntText(value=0, description="seed"),
    }
    button = w.Button(description="sample")
    output = w.Output()

    def draw(_=None) -> None:
        values = {k: c.value for k, c in controls.items()}
        output.clear_output(wait=True)
        with output:
            try:
                display(compare(pipes, values["prompt"], values["steps"], values["guidance_scale"],
                                values["llm_guidance_scale"], values["seed"], values["word"] or None))
            except ValueError as err:
                print(f"error: {err}")

    button.on_click(draw)
    draw()
    return w.VBox([*controls.values(), button, output])

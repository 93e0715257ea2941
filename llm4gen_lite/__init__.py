"""llm4gen_lite: LLM4GEN (an LLM's token features fused into a text-to-image diffusion model
through a Cross-Adapter Module), built, trained and evaluated end to end on a laptop CPU.

Offline by default: the Hugging Face hub is never contacted unless `HF_HUB_OFFLINE=0` is set
before import.
"""
import os as _os

_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", _os.environ["HF_HUB_OFFLINE"])

__version__ = "0.1.0"

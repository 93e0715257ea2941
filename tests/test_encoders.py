"""Frozen text encoders: tiny random Llama / T5 / CLIP folders through `load_encoder(path)`, the
packaged MiniLM and SmolLM2, padding, layers, offsets, truncation, the converted-model cache and
bad input."""
from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from llm4gen_lite import encoders
from llm4gen_lite.encoders import (
    CLIPTextEncoder,
    LLMEncoder,
    PromptTruncatedWarning,
    TextFeatures,
    cached_model_folder,
    converted_smollm2_dir,
    load_encoder,
    token_indices_for_span,
)

PROMPTS = ["a small red circle left of a large blue square", "", "two green triangles"]


def check_contract(enc, feats: TextFeatures, n: int) -> None:
    assert feats.features.shape == (n, enc.max_length, enc.dim)
    assert feats.features.dtype == torch.float32 and feats.mask.dtype == torch.bool
    assert feats.mask.shape == (n, enc.max_length) and feats.mask.any(dim=1).all()
    assert torch.all(feats.features[~feats.mask] == 0), "padding features must be zero"
    assert all(len(row) == enc.max_length for row in feats.offsets) and len(feats.truncated) == n
    for row, row_mask in zip(feats.offsets, feats.mask):
        assert all(span == (0, 0) for span, real in zip(row, row_mask.tolist()) if not real)
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training


@pytest.mark.parametrize("fixture, kind, max_length", [
    ("tiny_llama_dir", LLMEncoder, 256), ("tiny_t5_dir", LLMEncoder, 256), ("tiny_clip_text_dir", CLIPTextEncoder, 77),
])
def test_tiny_folders_load_and_honour_the_contract(request, fixture, kind, max_length):
    enc = load_encoder(request.getfixturevalue(fixture))
    assert isinstance(enc, kind) and enc.max_length == max_length and enc.dim == 32
    feats = enc.encode(PROMPTS)
    check_contract(enc, feats, len(PROMPTS))
    assert feats.truncated == [False] * 3
    assert enc.to("cpu") is enc and feats.to("cpu").features.device.type == "cpu"
    assert load_encoder(request.getfixturevalue(fixture)).identity == enc.identity, "identity must be stable"


@pytest.mark.parametrize("fixture, kwargs", [
    ("tiny_llama_dir", {}), ("tiny_t5_dir", {}), ("tiny_clip_text_dir", {"sd_padding": False}),
    ("tiny_clip_text_dir", {"sd_padding": True}),
])
def test_padding_never_changes_real_tokens(request, fixture, kwargs):
    enc = load_encoder(request.getfixturevalue(fixture), **kwargs)
    alone = enc.encode(["a red circle"])
    long_prompt = "an outline yellow diamond above a filled purple square and a circle"
    batched = enc.encode(["a red circle", long_prompt])
    n = len(enc.tokenizer("a red circle")["input_ids"])
    assert n < len(enc.tokenizer(long_prompt)["input_ids"])
    assert torch.equal(alone.mask[0], batched.mask[0])
    assert int(alone.mask[0].sum()) == (enc.max_length if kwargs.get("sd_padding") else n)
    torch.testing.assert_close(batched.features[0, :n], alone.features[0, :n], atol=1e-5, rtol=1e-5)
    assert alone.offsets[0] == batched.offsets[0]


def test_clip_sd_padding_matches_stable_diffusion(tiny_clip_text_dir):
    """Default CLIP features equal what SD1.5's pipeline feeds its UNet: all 77 positions, no mask."""
    from transformers import AutoTokenizer, CLIPTextModel

    prompts = ["a red circle", ""]
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_text_dir / "tokenizer")
    model = CLIPTextModel.from_pretrained(tiny_clip_text_dir / "text_encoder").eval()
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids)[0]
    enc = load_encoder(tiny_clip_text_dir)
    assert enc.sd_padding and ":pad=sd:" in enc.identity
    feats = enc.encode(prompts)
    assert feats.mask.all()
    torch.testing.assert_close(feats.features, expected, atol=1e-6, rtol=1e-6)
    masked = CLIPTextEncoder(tiny_clip_text_dir, sd_padding=False)
    assert masked.identity != enc.identity
    assert masked.encode(prompts).mask.sum(1).tolist() == [len(tokenizer(p)["input_ids"]) for p in prompts]


@pytest.mark.parametrize("fixture, layer, expected_layer", [
    ("tiny_llama_dir", None, 1), ("tiny_llama_dir", 0, 0), ("tiny_llama_dir", -1, 2),
    ("tiny_t5_dir", None, 2), ("tiny_t5_dir", -2, 1),
])
def test_layer_selection_matches_hidden_states(request, fixture, layer, expected_layer):
    """Dropping the blocks above the chosen layer gives exactly that layer's hidden state
    (defaults: round(0.6 * depth) for a decoder-only LM, the last layer for T5)."""
    from transformers import AutoModel, T5EncoderModel

    folder = request.getfixturevalue(fixture)
    enc = LLMEncoder(folder, layer=layer)
    assert enc.layer == expected_layer and f"layer={expected_layer}/2" in enc.identity
    full = (T5EncoderModel if fixture == "tiny_t5_dir" else AutoModel).from_pretrained(folder).eval()
    batch = enc.tokenizer(["a red circle", "two green triangles above"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = full(**batch, output_hidden_states=True).hidden_states[expected_layer]
    mask = batch["attention_mask"].bool()
    reference = F.layer_norm(hidden, hidden.shape[-1:])[mask]
    feats = enc.encode(["a red circle", "two green triangles above"])
    torch.testing.assert_close(feats.features[:, : mask.shape[1]][mask], reference, atol=1e-5, rtol=1e-5)


def test_unknown_stack_layout_reads_hidden_states(tiny_llama_dir, tmp_path):
    """A decoder-only model without a `layers`/`norm` stack (GPT-2) falls back to output_hidden_states."""
    from transformers import GPT2Config, GPT2Model

    folder = tmp_path / "tiny-gpt2"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    enc_llama = load_encoder(tiny_llama_dir)
    config = GPT2Config(vocab_size=len(enc_llama.tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                        bos_token_id=enc_llama.tokenizer.bos_token_id, eos_token_id=enc_llama.tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2Model(config).save_pretrained(folder)
    enc = load_encoder(folder, role="llm", layer=1, normalization="none")
    batch = enc.tokenizer(["a red circle"], return_tensors="pt")
    with torch.no_grad():
        reference = GPT2Model.from_pretrained(folder).eval()(**batch, output_hidden_states=True).hidden_states[1]
    feats = enc.encode(["a red circle"])
    torch.testing.assert_close(feats.features[0, : reference.shape[1]], reference[0], atol=1e-5, rtol=1e-5)


def test_llm_prepends_bos_when_the_tokenizer_does_not(tiny_llama_dir):
    enc = load_encoder(tiny_llama_dir, role="llm")
    feats = enc.encode(["red circle", ""])
    ids = enc.tokenizer(["red circle", ""])["input_ids"]
    assert ids[0][0] == ids[1][0] == enc.tokenizer.bos_token_id and ids[1] == [enc.tokenizer.bos_token_id]
    assert feats.offsets[0][0] == (0, 0) and int(feats.mask[1].sum()) == 1
    assert ":bos=1:" in enc.identity
    no_bos = LLMEncoder(tiny_llama_dir, add_bos=False)
    assert ":bos=0:" in no_bos.identity
    with pytest.raises(ValueError, match="no tokens"):
        no_bos.encode(["red circle", ""])


def test_t5_ends_with_eos_and_keeps_it_when_truncating(tiny_t5_dir):
    enc = LLMEncoder(tiny_t5_dir, max_length=8)
    with pytest.warns(PromptTruncatedWarning):
        feats = enc.encode(["a small red circle left of a large blue square", "red"])
    eos = enc.tokenizer.eos_token_id
    ids = enc.tokenizer(["red"])["input_ids"][0]
    assert ids[-1] == eos and feats.truncated == [True, False]
    assert int(feats.mask[0].sum()) == 8 and feats.offsets[0][7] == (0, 0)


def test_clip_truncation_warns_names_the_prompt_and_flags_it(tiny_clip_text_dir):
    enc = load_encoder(tiny_clip_text_dir, role="clip")
    long_prompt = " ".join(["red circle"] * 60)
    with pytest.warns(PromptTruncatedWarning) as record:
        feats = enc.encode(["blue square", long_prompt])
    message = str(record[0].message)
    assert "prompt 1" in message and "'red circle red circle" in message and "122 tokens" in message
    assert "blue square" not in message and len(message) < 400
    assert feats.truncated == [False, True] and int(feats.mask[1].sum()) == 77
    eos = enc.tokenizer.eos_token_id
    assert enc.tokenizer([long_prompt], truncation=True, max_length=77)["input_ids"][0][-1] == eos
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["blue square"])  # no warning without truncation


def test_clip_folder_layouts_and_offsets(tiny_clip_text_dir, tmp_path):
    flat = tmp_path / "flat-clip"
    shutil.copytree(tiny_clip_text_dir / "text_encoder", flat)
    for f in (tiny_clip_text_dir / "tokenizer").iterdir():
        shutil.copy(f, flat / f.name)
    prompt = "A  Red circle,  left of a BLUE square"
    a = load_encoder(tiny_clip_text_dir).encode([prompt])
    b = load_encoder(flat).encode([prompt])
    torch.testing.assert_close(a.features, b.features)
    row = a.offsets[0]
    for word in ("Red", "circle", "BLUE", "square"):
        start = prompt.index(word)
        hits = token_indices_for_span(row, start, start + len(word))
        assert hits and "".join(prompt[row[i][0] : row[i][1]] for i in hits).strip() == word


def test_llm_offsets_cover_words(tiny_llama_dir):
    enc = load_encoder(tiny_llama_dir)
    prompt = "a small red circle,  left of a large blue square"
    feats = enc.encode([prompt])
    row = feats.offsets[0]
    ids = enc.tokenizer([prompt])["input_ids"][0]
    for i, (a, b) in enumerate(row[: len(ids)]):
        if (a, b) != (0, 0):
            assert enc.tokenizer.decode([ids[i]]) == prompt[a:b]
    start = prompt.index("blue")
    hits = token_indices_for_span(row, start, start + 4)
    assert "".join(prompt[row[i][0] : row[i][1]] for i in hits).strip() == "blue"


def test_token_indices_for_span():
    row = [(0, 0), (0, 1), (1, 7), (7, 11), (11, 18), (0, 0)]
    assert token_indices_for_span(row, 2, 7) == [2]
    assert token_indices_for_span(row, 8, 11) == [3]
    assert token_indices_for_span(row, 5, 9) == [2, 3]
    assert token_indices_for_span(row, 0, 1) == [1]
    assert token_indices_for_span(row, 30, 40) == []
    with pytest.raises(ValueError, match="start < end"):
        token_indices_for_span(row, 5, 5)


def test_identity_names_every_key_part(tiny_llama_dir):
    base = LLMEncoder(tiny_llama_dir)
    variants = [
        LLMEncoder(tiny_llama_dir, layer=2),
        LLMEncoder(tiny_llama_dir, max_length=128),
        LLMEncoder(tiny_llama_dir, normalization="none"),
        LLMEncoder(tiny_llama_dir, add_bos=False),
        LLMEncoder(tiny_llama_dir, dtype=torch.bfloat16),
    ]
    identities = {base.identity} | {v.identity for v in variants}
    assert len(identities) == 6
    assert "max_length=128" in variants[1].identity and "norm=none" in variants[2].identity


def test_load_spec_rebuilds_the_encoder(tiny_llama_dir, tiny_clip_text_dir, monkeypatch):
    import json

    monkeypatch.chdir(tiny_llama_dir.parent)
    enc = load_encoder(tiny_llama_dir.name, layer=0, dtype=torch.bfloat16)  # a relative folder
    spec = json.loads(json.dumps(enc.load_spec))
    assert spec == {"name_or_path": str(tiny_llama_dir.resolve()), "role": "llm", "layer": 0, "dtype": "bfloat16"}
    monkeypatch.chdir("/")
    assert load_encoder(**spec).identity == enc.identity
    clip = load_encoder(tiny_clip_text_dir, sd_padding=False)
    assert clip.load_spec["role"] == "clip" and load_encoder(**clip.load_spec).identity == clip.identity
    with pytest.raises(ValueError, match="dtype must be"):
        LLMEncoder(tiny_llama_dir, dtype="float99")


def test_changed_weights_change_identity(tiny_llama_dir, tmp_path):
    copy = tmp_path / tiny_llama_dir.name
    shutil.copytree(tiny_llama_dir, copy)
    assert LLMEncoder(copy).identity == LLMEncoder(tiny_llama_dir).identity
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    model.save_pretrained(copy)
    assert LLMEncoder(copy).identity != LLMEncoder(tiny_llama_dir).identity


def test_bad_prompts_are_rejected(tiny_clip_text_dir):
    enc = load_encoder(tiny_clip_text_dir)
    with pytest.raises(TypeError, match="single string"):
        enc.encode("a red circle")
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        enc.encode(["a red circle", 3])
    with pytest.raises(TypeError, match="list of strings"):
        enc.encode(None)


def test_bad_loader_arguments(tiny_llama_dir, tiny_clip_text_dir, tmp_path):
    with pytest.raises(ValueError, match="'minilm', 'smollm2'"):
        load_encoder("no-such-encoder")
    with pytest.raises(FileNotFoundError, match="local folder"):
        load_encoder(str(tmp_path / "missing" / "folder"))
    with pytest.raises(ValueError, match="role must be"):
        load_encoder(tiny_llama_dir, role="vision")
    with pytest.raises(ValueError, match="role='clip'"):
        load_encoder(tiny_clip_text_dir, role="llm")
    with pytest.raises(ValueError, match="role='llm'"):
        load_encoder(tiny_llama_dir, role="clip")
    with pytest.raises(ValueError, match="role='clip'"):
        load_encoder("minilm", role="llm")
    with pytest.raises(ValueError, match=r"layer must be an int in \[-3, 2\]"):
        LLMEncoder(tiny_llama_dir, layer=3)
    with pytest.raises(ValueError, match="normalization"):
        LLMEncoder(tiny_llama_dir, normalization="rms")
    with pytest.raises(ValueError, match="position embeddings"):
        CLIPTextEncoder(tiny_clip_text_dir, max_length=78)
    with pytest.raises(TypeError, match="name_or_path"):
        load_encoder(3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder(tmp_path / "empty")


def test_missing_weights_are_an_error(tiny_llama_dir, tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "mismatch"
    shutil.copytree(tiny_llama_dir, folder)
    config = LlamaConfig.from_pretrained(folder)
    config.num_hidden_layers = 3  # the weights hold only 2 layers
    config.save_pretrained(folder)
    with pytest.raises(ValueError, match="do not belong together"):
        LLMEncoder(folder)


def test_hub_id_in_the_local_hf_cache(tiny_llama_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = load_encoder("someone/tiny-llama")
    assert isinstance(enc, LLMEncoder) and enc.encode(["red"]).features.shape == (1, 256, 32)
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        load_encoder("someone/not-cached")


def test_shapesclip_name_dispatches_lazily(monkeypatch):
    """`load_encoder("shapesclip")` imports llm4gen_lite.shapes_clip only when asked."""
    import sys
    import types

    fake = types.ModuleType("llm4gen_lite.shapes_clip")
    fake.load_text_encoder = lambda **kwargs: types.SimpleNamespace(kwargs=kwargs)
    monkeypatch.setitem(sys.modules, "llm4gen_lite.shapes_clip", fake)
    enc = load_encoder("shapesclip", device=torch.device("cpu"))
    assert enc.kwargs == {"device": torch.device("cpu")}
    assert enc.load_spec == {"name_or_path": "shapesclip", "role": "clip", "device": "cpu"}


# ---- the converted-model cache ---------------------------------------------------------------


def test_cached_model_folder_builds_once_rebuilds_when_corrupt(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "weights.bin").write_bytes(os.urandom(1000))
        (out / "config.json").write_text('{"a": 1}')

    target = tmp_path / "models" / "m"
    assert cached_model_folder(target, "src1", build) == target and len(calls) == 1
    cached_model_folder(target, "src1", build)
    assert len(calls) == 1, "an intact folder is reused"
    (target / "weights.bin").write_bytes(b"short")
    with pytest.warns(UserWarning, match="rebuilding"):
        cached_model_folder(target, "src1", build)
    assert len(calls) == 2 and (target / "weights.bin").stat().st_size == 1000
    with pytest.warns(UserWarning, match="rebuilding"):
        cached_model_folder(target, "src2", build)
    assert len(calls) == 3, "a new source is a rebuild"
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")], "no temp folders left"


def test_cached_model_folder_interrupted_build_leaves_nothing(tmp_path):
    def failing(out):
        (out / "half.bin").write_bytes(b"x" * 100)
        raise KeyboardInterrupt

    target = tmp_path / "models" / "m"
    with pytest.raises(KeyboardInterrupt):
        cached_model_folder(target, "src", failing)
    assert not target.exists() and list(target.parent.iterdir()) == []


# ---- the packaged models ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_dir():
    """The packaged SmolLM2 converted to safetensors in the user cache (once per machine, 15-60 s)."""
    return converted_smollm2_dir()


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_encoder("smollm2")


def test_minilm_packaged():
    enc = load_encoder("minilm")
    feats = enc.encode(["a small red circle left of a large blue square", ""])
    assert feats.features.shape == (2, 77, 384)
    check_contract(enc, feats, 2)
    assert int(feats.mask[1].sum()) == 2  # [CLS] [SEP]
    assert enc.identity.startswith("clip:all-MiniLM-L6-v2@")


def test_smollm2_packaged(smollm2):
    assert smollm2.layer == 18 and ":layer=18/30:" in smollm2.identity and smollm2.identity.startswith("llm:SmolLM2")
    feats = smollm2.encode(["a small red circle left of a large blue square", ""])
    assert feats.features.shape == (2, 256, 576)
    check_contract(smollm2, feats, 2)
    assert int(feats.mask[1].sum()) == 1  # the BOS token alone
    real = feats.features[0][feats.mask[0]]
    torch.testing.assert_close(real.pow(2).mean(-1), torch.ones(len(real)), atol=1e-3, rtol=1e-3)  # LayerNorm


def test_smollm2_offsets_are_exact(smollm2):
    prompt = "A crème brûlée ☕ and  a red\tsquare, 红色的圆"
    feats = smollm2.encode([prompt])
    ids = smollm2.tokenizer([prompt])["input_ids"][0]
    row = feats.offsets[0]
    spans = [row[i] for i in range(len(ids)) if row[i] != (0, 0)]
    assert spans == sorted(spans) and all(0 <= a < b <= len(prompt) for a, b in spans)
    assert {c for a, b in spans for c in range(a, b)} == set(range(len(prompt))), "every character is covered"
    for word in ("brûlée", "red", "square", "红色的圆", "☕"):
        start = prompt.index(word)
        hits = token_indices_for_span(row, start, start + len(word))
        assert smollm2.tokenizer.decode([ids[i] for i in hits]).strip() == word


def test_converted_smollm2_cache_is_reused_and_rebuilt_when_corrupt(
    smollm2_dir, smollm2, isolated_cache, monkeypatch
):
    """The GGUF conversion is replaced by links to the already converted files (the real one takes
    15-60 s); what is tested is the reuse / corruption / rebuild logic around it."""
    calls = []

    def fake_convert(gguf, out):
        calls.append(gguf)
        for f in smollm2_dir.iterdir():
            if f.name != "manifest.json":
                (out / f.name).symlink_to(f)

    monkeypatch.setattr(encoders, "_convert_gguf", fake_convert)
    folder = converted_smollm2_dir()
    assert folder.parent == isolated_cache / "models" and len(calls) == 1
    assert converted_smollm2_dir() == folder and len(calls) == 1
    (folder / "config.json").unlink()
    (folder / "config.json").write_text('{"model_type": "llama", "garbage": true}')
    with pytest.warns(UserWarning, match="rebuilding"):
        encoder = LLMEncoder()
    assert len(calls) == 2 and encoder.identity == smollm2.identity, "the identity names the GGUF, not the cache"
    torch.testing.assert_close(encoder.encode(["red circle"]).features, smollm2.encode(["red circle"]).features)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()[:4096]
    weights.unlink()
    weights.write_bytes(data)
    with pytest.warns(UserWarning, match="rebuilding"):
        converted_smollm2_dir()
    assert len(calls) == 3 and (folder / "model.safetensors").stat().st_size > 10**8

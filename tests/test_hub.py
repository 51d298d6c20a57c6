"""Presets with real sizes, built on the meta device, against the key lists of the released checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from groundseg import CheckpointError, load_model
from groundseg.config import preset_config
from groundseg.hub import _clip_prefix, build_model, ours_to_official

from conftest import SHARED, need


def official_keys(name: str) -> dict[str, tuple[int, ...]]:
    rows = {}
    for line in need(SHARED / "parity" / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        rows[key] = tuple(json.loads(shape))
    return rows


@pytest.mark.parametrize("preset,keys", [("lisa-7b", "lisa_7b_keys.txt"), ("lisa-13b", "lisa_13b_keys.txt")])
def test_real_size_presets_match_released_keys(preset, keys):
    model = build_model(preset_config(preset), None, device="meta")
    assert next(model.parameters()).is_meta
    prefix = _clip_prefix(model)
    ours = {ours_to_official(k, prefix): tuple(v.shape) for k, v in model.state_dict().items()
            if not k.startswith(prefix)}  # released LISA checkpoints carry no CLIP weights
    ref = {k: v for k, v in official_keys(keys).items() if not k.endswith("rotary_emb.inv_freq")}
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    mismatched = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert mismatched == {}
    n = sum(v.numel() for v in model.parameters())
    assert n > 6.9e9 if preset == "lisa-7b" else n > 13e9


def test_clip_of_real_presets_is_vit_l14_224():
    model = build_model(preset_config("lisa-7b"), None, device="meta")
    feats = model.vlm.vision_tower.config
    assert (feats.image_size, feats.patch_size, feats.hidden_size) == (224, 14, 1024)
    assert model.config.vision.num_patches == 256  # LISA's 255 = 256 - 1 offset assumes this


def test_load_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="unknown model 'lisa-70b'"):
        load_model("lisa-70b")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a checkpoint folder, got a file"):
        load_model(tmp_path / "f.bin")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Other"]}))
    with pytest.raises(CheckpointError, match="neither a groundseg config"):
        load_model(tmp_path)


def test_untrusted_pickle_is_refused(tmp_path, lisa_parity):
    """A .bin that unpickles to anything but tensors and containers is rejected (weights_only)."""
    import pickle

    from conftest import write_official_lisa

    cfg, _, _, state = lisa_parity
    ckpt, _ = write_official_lisa(tmp_path, cfg, state)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        load_model(ckpt)


def test_tiny_preset_is_deterministic_and_saves(tmp_path):
    a, b = load_model("lisa-tiny"), load_model("lisa-tiny")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert a.config.llm["vocab_size"] == len(a.tokenizer)
    from groundseg import save_pretrained

    c = load_model(save_pretrained(a, tmp_path / "m"))
    assert c.config.preset == "lisa-tiny"
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_shipped_tokenizer_is_reproducible(tmp_path):
    """The shipped tokenizer is exactly what our training code produces."""
    from groundseg.grounding.tiny_tokenizer import train_tiny_tokenizer
    from groundseg.hub import ASSETS, load_tokenizer

    shipped = load_tokenizer(ASSETS / "lisa-tiny")
    fresh = train_tiny_tokenizer()
    assert shipped.get_vocab() == fresh.get_vocab()
    text = "What is the red circle in this image? Sure, [SEG]. <ref>a</ref><box>(1,2),(3,4)</box>"
    assert shipped(text).input_ids == fresh(text).input_ids
    assert shipped.convert_tokens_to_ids("[SEG]") in shipped(text).input_ids


def test_shapes_tokenizer_is_reproducible_and_spells_digits():
    """shapes-demo's tokenizer: rebuilt by our code from the shapes world, digits one per token, each object name
    one token (longest match), and [SEG] swallowing the space before it (so the state that prompts SAM is the
    name's token)."""
    from groundseg.grounding.tiny_tokenizer import train_shapes_tokenizer
    from groundseg.hub import ASSETS, load_tokenizer

    shipped = load_tokenizer(ASSETS / "shapes-demo")
    assert shipped.get_vocab() == train_shapes_tokenizer().get_vocab()
    ids = shipped(" Sure, the red circle [SEG]. <box>(120,985)", add_special_tokens=False).input_ids
    toks = shipped.convert_ids_to_tokens(ids)
    assert toks[toks.index("[SEG]") - 1] == " red circle"
    assert [t for t in toks if t.isdigit()] == list("120985")
    for text, name in [(" the small red circle [SEG]", " small red circle"), (" all the large shapes", " large shapes"),
                       (" the second blue triangle from the left", " blue triangle")]:
        toks = shipped.convert_ids_to_tokens(shipped(text, add_special_tokens=False).input_ids)
        assert name in toks, toks
        assert shipped.decode(shipped(text, add_special_tokens=False).input_ids) == text.replace(" [SEG]", "[SEG]")
    # single words stay ordinary BPE tokens
    assert shipped.convert_ids_to_tokens(shipped(" the circle", add_special_tokens=False).input_ids) == ["Ġthe", "Ġcircle"]


def test_tied_word_embeddings_save_once_and_stay_tied(tmp_path):
    from safetensors.torch import load_file
    from groundseg import save_pretrained
    from groundseg.hub import load_tokenizer, preset_tokenizer_dir

    cfg = preset_config("lisa-tiny")
    cfg.llm["tie_word_embeddings"] = True
    a = build_model(cfg, load_tokenizer(preset_tokenizer_dir("lisa-tiny")))
    lm = a.vlm.language_model
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    folder = save_pretrained(a, tmp_path / "tied")
    keys = set(load_file(str(folder / "model.safetensors")))
    assert "vlm.language_model.model.embed_tokens.weight" in keys
    assert "vlm.language_model.lm_head.weight" not in keys  # stored once
    b = load_model(folder)
    lm_b = b.vlm.language_model
    assert lm_b.lm_head.weight is lm_b.model.embed_tokens.weight  # tied again, not two copies
    assert torch.equal(lm_b.lm_head.weight, lm.model.embed_tokens.weight)

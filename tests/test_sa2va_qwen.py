"""Sa2VA on Qwen2.5-VL (groundseg/grounding/sa2va_qwen.py) on the sa2va-qwen-tiny preset: the release's key layout,
loading release-style folders (both transformers layouts and xtuner's ``mllm.`` layout) and our own format, the
prompt, where the ``[SEG]`` states are read, and the image and video paths. No real release is at hand: the
release-style folders are written here from the tiny model's tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from groundseg.hub import CheckpointError, load_model, save_pretrained

PREFIXES = ("model.", "grounding_encoder.sam2_model.", "text_hidden_fcs.")
ANSWER = "Sure, [SEG]."
# Qwen2.5-VL's chat template as tools/convert_to_hf.py leaves it in config.json["template"] (system turn removed)
STRIPPED_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DEFAULT_TEMPLATE = STRIPPED_TEMPLATE.replace(
    "{% for message in messages %}", "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", 1)


def square(h=40, w=64, x=10):
    rgb = np.full((h, w, 3), 30, np.uint8)
    rgb[5:20, x:x + 20] = (250, 40, 40)
    return rgb


def same_results(a, b):
    assert a.text == b.text
    assert np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.scores, b.scores)


@pytest.fixture(scope="module")
def model():
    m = load_model("sa2va-qwen-tiny")
    from groundseg.grounding.sa2va_qwen import Sa2VAQwenModel

    assert isinstance(m, Sa2VAQwenModel)
    return m


@pytest.fixture(scope="module")
def reference(model):
    """The tiny model's teacher-forced result on the square image (what every reloaded copy must reproduce)."""
    return model.segment(square(), "the red square", answer=ANSWER)[0]


def write_release(folder, model, layout="modern", drop=(), template=STRIPPED_TEMPLATE):
    """A release-style folder: config.json as Sa2VAChatConfigQwen saves it (a Qwen2_5_VLConfig + template), the
    tensors under release names, the tokenizer. The tiny SAM2 and pixel budget go in the optional 'groundseg' object
    (a release has none and gets SAM2.0 Hiera-L)."""
    from safetensors.torch import save_file

    from groundseg.grounding.sa2va_qwen import official_state_dict

    folder.mkdir(parents=True)
    raw = model.model.config.to_dict()
    c = model.config
    raw.update(architectures=["Sa2VAChatModelQwen"], model_type="sa2va_chat", template=template,
               auto_map={"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
                         "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen"},
               groundseg={"sam2": {"config_file": c.sam2.config_file, "overrides": c.sam2.overrides},
                          "min_pixels": c.min_pixels, "max_pixels": c.max_pixels})
    (folder / "config.json").write_text(json.dumps(raw))
    state = {k: v.contiguous() for k, v in official_state_dict(model, layout).items() if k not in drop}
    save_file(state, str(folder / "model.safetensors"))
    model.tokenizer.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------------------------------- layout

def test_keys_are_the_release_layout(model):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from groundseg.grounding.sa2va_hub import ours_to_official
    from groundseg.grounding.sa2va_qwen import official_state_dict, official_to_ours

    keys = list(model.state_dict())
    assert all(k.startswith(PREFIXES) for k in keys)
    # `model.*` is transformers' Qwen2_5_VLForConditionalGeneration as it is
    with torch.device("meta"):
        bare = Qwen2_5_VLForConditionalGeneration(model.config.qwen_config())
    assert {k for k in keys if k.startswith("model.")} == {"model." + k for k in bare.state_dict()}
    assert "model.lm_head.weight" in keys and "model.model.visual.merger.mlp.0.weight" in keys
    assert "model.model.language_model.embed_tokens.weight" in keys
    assert sorted(k for k in keys if k.startswith("text_hidden_fcs.")) == [
        f"text_hidden_fcs.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    renamed = sorted(k for k in keys if ours_to_official(k) != k)
    assert renamed == [f"grounding_encoder.sam2_model.memory_encoder.fuser.layers.{i}.gamma" for i in (0, 1)]
    assert ours_to_official(renamed[0]).endswith("fuser.layers.0.g_weight")
    for layout in ("modern", "legacy", "xtuner"):
        official = official_state_dict(model, layout)
        assert {official_to_ours(k) for k in official} == set(keys), layout
    legacy = official_state_dict(model, "legacy")
    assert "model.model.embed_tokens.weight" in legacy and "model.visual.merger.mlp.0.weight" in legacy
    assert "mllm.grounding_encoder.sam2_model.memory_encoder.fuser.layers.1.g_weight" in official_state_dict(
        model, "xtuner")


def test_release_3b_layout_on_meta():
    """Sa2VA-Qwen2_5-VL-3B's config.json in the flat layout of transformers 4.49 (Qwen2.5-VL-3B-Instruct's values,
    vocabulary + Sa2VA's 5 tokens), built on the meta device: 4.294 B numbers (reference/sa2va.md §1.1: the release's
    F32 total, lm_head untied), SAM2.0 Hiera-L's 900 keys, H = 2048."""
    from groundseg.grounding.sa2va_hub import build_sa2va
    from groundseg.grounding.sa2va_qwen import config_from_official_qwen

    raw = {"architectures": ["Sa2VAChatModelQwen"], "model_type": "sa2va_chat", "hidden_size": 2048,
           "intermediate_size": 11008, "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
           "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151670,
           "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": True,
           "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653, "template": STRIPPED_TEMPLATE, "torch_dtype": "float32",
           "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                             "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                             "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                             "tokens_per_second": 2, "temporal_patch_size": 2, "model_type": "qwen2_5_vl"}}
    cfg = config_from_official_qwen(raw)
    cfg.set_tied(False)  # what load_official_sa2va_qwen decides when the folder holds model.lm_head.weight
    m = build_sa2va(cfg, None, device="meta")
    state = m.state_dict()
    assert abs(sum(v.numel() for v in state.values()) / 1e9 - 4.294) < 0.001
    assert sum(k.startswith("grounding_encoder.sam2_model.") for k in state) == 900
    assert m.hidden_size == 2048 and tuple(state["text_hidden_fcs.2.weight"].shape) == (256, 2048)
    assert tuple(state["model.lm_head.weight"].shape) == (151670, 2048)


def test_detection_tells_the_two_families_apart():
    from groundseg.grounding.sa2va_hub import is_official_sa2va
    from groundseg.grounding.sa2va_qwen import is_official_sa2va_qwen

    qwen = {"architectures": ["Sa2VAChatModelQwen"], "model_type": "sa2va_chat", "text_config": {},
            "vision_config": {}}
    internvl = {"architectures": ["Sa2VAChatModel"], "model_type": "sa2va_chat", "llm_config": {},
                "vision_config": {}}
    assert is_official_sa2va_qwen(qwen) and not is_official_sa2va(qwen)
    assert is_official_sa2va(internvl) and not is_official_sa2va_qwen(internvl)
    assert is_official_sa2va_qwen({"model_type": "sa2va_qwen2_5_vl"})
    assert not is_official_sa2va_qwen({"architectures": ["Qwen2_5_VLForConditionalGeneration"],
                                       "model_type": "qwen2_5_vl"})  # a plain Qwen2.5-VL is no Sa2VA


# ------------------------------------------------------------------------------------------- prompt

def test_prompt_and_vision_tokens(model, tmp_path):
    from groundseg.grounding.sa2va_qwen import config_from_official_qwen, system_prompt_of

    pixels, grid = model.pixel_values([square()])
    # 40x64 -> 56x84 (fetch_image's rounding to 28) -> 112x140 (at least 16 * 28^2 pixels): 8x10 patches
    assert grid.tolist() == [[1, 8, 10]]
    assert pixels.shape == (80, 3 * 2 * 14 * 14)
    assert model.tokens_per_image(grid) == [20]
    text = model.prompt_text("<image>\nPlease segment the red square.", [20, 6])
    assert text == ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 20 + "<|vision_end|><|vision_start|>"
                    + "<|image_pad|>" * 6 + "<|vision_end|>\nPlease segment the red square.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = model.encode_text(text)
    assert ids.count(5) == 26 and ids.count(3) == 2 and ids.count(4) == 2 and ids[:2] == [1, model.encode_text(
        "user\n")[0]]
    # the system turn follows the processor template a folder ships (stripped in the release's config.json)
    assert system_prompt_of(tmp_path, {"template": STRIPPED_TEMPLATE}) == ""
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": DEFAULT_TEMPLATE}))
    assert system_prompt_of(tmp_path, {"template": STRIPPED_TEMPLATE}) == "You are a helpful assistant."
    cfg = config_from_official_qwen({"vision_config": {}, "template": DEFAULT_TEMPLATE},
                                    system_prompt="You are a helpful assistant.")
    assert cfg.system_prompt == "You are a helpful assistant." and cfg.min_pixels == 512 * 28 * 28
    assert cfg.sam2.config_file == "configs/sam2/sam2_hiera_l.yaml"


# ------------------------------------------------------------------------------------------- [SEG] states

def _manual_states(model, ids, pixels, grid):
    with torch.no_grad():
        out = model.model(**model.mllm_inputs(torch.tensor([ids]), pixels, grid), output_hidden_states=True)
    return out.hidden_states[-1][0]


def test_seg_state_is_taken_at_the_seg_position(model):
    pixels, grid = model.pixel_values([square()])
    question = "<image>\nPlease segment the red square."
    with torch.no_grad():
        g = model.ground(pixels, grid, question, answer=ANSWER)
    ids = model.encode_text(model.prompt_text(question, [20])) + model.encode_text(ANSWER)
    states = _manual_states(model, ids, pixels, grid)
    p = ids.index(model.seg_token_id)
    assert g.seg_hidden_states.shape == (1, 64)
    torch.testing.assert_close(g.seg_hidden_states[0], states[p], atol=1e-5, rtol=0)
    assert (g.seg_hidden_states[0] - states[p - 1]).abs().max() > 1e-2  # not LISA's state before [SEG]
    with torch.no_grad():
        torch.testing.assert_close(g.seg_embeddings, model.text_hidden_fcs(states[p:p + 1]), atol=1e-5, rtol=0)
    # mrope: the image tokens carry 3D positions, so a plain 1D-position forward differs
    with torch.no_grad():
        flat = model.model(input_ids=torch.tensor([ids]), pixel_values=pixels, image_grid_thw=grid,
                           output_hidden_states=True).hidden_states[-1][0]
    assert (flat[p] - states[p]).abs().max() > 1e-4


def test_generated_seg_states_and_stop(model):
    """Greedy generation, steered by a bias on lm_head: three [SEG] in a row have states for the first two only
    (the final token is never fed), equal to a forward over the generated ids; a stop token ends the answer."""
    pixels, grid = model.pixel_values([square()])
    question = "<image>\nPlease segment the red square."
    prompt = model.encode_text(model.prompt_text(question, [20]))
    head = model.model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
    try:
        model.model.lm_head = biased
        with torch.no_grad():
            biased.bias[model.seg_token_id] = 1e4
            g = model.ground(pixels, grid, question, max_new_tokens=3)
            biased.bias.zero_()
            biased.bias[2] = 1e4  # <|im_end|>
            stop = model.ground(pixels, grid, question, max_new_tokens=5)
    finally:
        model.model.lm_head = head
    seg = model.seg_token_id
    assert g.answer_ids == [seg, seg, seg] and g.text == "[SEG][SEG][SEG]"
    states = _manual_states(model, prompt + [seg, seg, seg], pixels, grid)
    assert g.seg_hidden_states.shape == (2, 64)
    torch.testing.assert_close(g.seg_hidden_states, states[len(prompt):len(prompt) + 2], atol=1e-4, rtol=0)
    assert stop.answer_ids == [2] and stop.text == "<|im_end|>" and len(stop.seg_embeddings) == 0


# ------------------------------------------------------------------------------------------- images and videos

def test_segment_with_a_fixed_answer(model, reference):
    res = reference
    assert res.text == ANSWER
    assert res.masks.shape == (1, 40, 64) and res.masks.dtype == bool
    assert res.phrases == [None] and res.sources == ["seg"]
    # the mask is SAM2's best-of-3 decode of the [SEG] embedding on the image's features
    sam = model.grounding_encoder
    pixels, grid = model.pixel_values([square()])
    with torch.no_grad():
        g = model.ground(pixels, grid, "<image>\nPlease segment the red square.", answer=ANSWER)
        feats = sam.encode(sam.preprocess(square())[None])
        logits = sam.postprocess(sam.decode(feats, language=g.seg_embeddings).low_res_masks, (40, 64))[:, 0]
    assert np.array_equal(res.masks, (logits > 0).numpy())
    no_seg = model.segment(square(), "the red square", answer="No.")[0]
    assert no_seg.masks.shape == (0, 40, 64)


def test_track_streams_every_frame(model):
    frames = [square(x=4 + 5 * t) for t in range(6)]
    groundings: list = []
    out = list(model.track(frames, ["the red square", "the background"], num_key_frames=1, answer=ANSWER,
                           groundings=groundings))
    assert [f.index for f in out] == list(range(6))
    assert [f.key_frame for f in out] == [True] + [False] * 5
    for f in out:
        assert f.logits.shape == (2, 40, 64) and torch.isfinite(f.logits).all()
        assert f.object_scores.shape == (2,) and (f.logits > -1e4).all()  # both objects are tracked
        assert f.masks.shape == (2, 40, 64)
    assert [len(g.seg_embeddings) for g in groundings] == [1, 1]
    # one key frame: the MLLM sees what segment() shows it, so frame 0 is segment()'s result
    for k, p in enumerate(["the red square", "the background"]):
        res = model.segment(frames[0], p, answer=ANSWER)[0]
        assert np.array_equal(res.masks[0], out[0].masks[k])
    assert not torch.equal(out[1].logits, out[0].logits)  # later frames come from SAM2's memory


# ------------------------------------------------------------------------------------------- folders

def test_our_format_round_trip(model, reference, tmp_path):
    folder = save_pretrained(model, tmp_path / "ours")
    raw = json.loads((folder / "config.json").read_text())
    assert raw["family"] == "sa2va" and raw["backbone"] == "qwen2_5_vl" and raw["preset"] == "sa2va-qwen-tiny"
    loaded = load_model(folder)
    assert type(loaded) is type(model)
    ours = model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())
    same_results(loaded.segment(square(), "the red square", answer=ANSWER)[0], reference)


@pytest.mark.parametrize("layout", ["modern", "legacy", "xtuner"])
def test_release_folders_load(model, reference, tmp_path, layout):
    folder = write_release(tmp_path / layout, model, layout)
    loaded = load_model(folder)
    assert type(loaded) is type(model) and loaded.config.system_prompt == ""
    assert loaded.config.out_dim == 32 and not loaded.model.config.tie_word_embeddings
    ours = model.state_dict()
    assert set(loaded.state_dict()) == set(ours)
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())
    same_results(loaded.segment(square(), "the red square", answer=ANSWER)[0], reference)


def test_bad_folders_are_one_line_errors(model, tmp_path):
    missing = "model.model.language_model.norm.weight"
    folder = write_release(tmp_path / "missing", model, drop=(missing,))
    with pytest.raises(CheckpointError) as e:
        load_model(folder)
    assert missing in str(e.value) and "missing" in str(e.value) and "\n" not in str(e.value)
    qwen3 = tmp_path / "qwen3"
    qwen3.mkdir()
    (qwen3 / "config.json").write_text(json.dumps({"architectures": ["Sa2VAChatModelQwen"], "model_type": "sa2va_chat",
                                                   "text_config": {"model_type": "qwen3_vl_text"},
                                                   "vision_config": {"model_type": "qwen3_vl"}}))
    with pytest.raises(CheckpointError, match="Qwen3-VL") as e:
        load_model(qwen3)
    assert "\n" not in str(e.value)

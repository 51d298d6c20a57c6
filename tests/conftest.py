"""Shared fixtures: paths to ../shared, the official-layout LISA checkpoint made from the parity fixture, and the
tiny preset model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LISA_TINY = SHARED / "parity" / "lisa_tiny"
MEDIA = SHARED / "fixtures" / "media"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not beside the checkout)")
    return path


@pytest.fixture(scope="session")
def media() -> Path:
    return need(MEDIA)


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """``shapes_folder(seed, images)``: a shapes world written to disk (96-px images, REFER files under
    ``shapes/``), made once per session for each (seed, images) and shared by the modules that ask for it."""
    from groundseg.datasets.shapes import write_shapes

    made: dict[tuple[int, int], Path] = {}

    def get(seed: int, images: int) -> Path:
        if (seed, images) not in made:
            out = tmp_path_factory.mktemp(f"shapes_s{seed}_n{images}")
            write_shapes(out, seed=seed, images=images, image_size=96)
            made[seed, images] = out
        return made[seed, images]

    return get


@pytest.fixture(scope="session")
def lisa_parity():
    """(config dict, inputs, outputs, official state dict) of ../shared/parity/lisa_tiny."""
    from safetensors.torch import load_file

    need(LISA_TINY)
    cfg = json.loads((LISA_TINY / "config.json").read_text())
    return (cfg, load_file(str(LISA_TINY / "inputs.safetensors")), load_file(str(LISA_TINY / "outputs.safetensors")),
            load_file(str(LISA_TINY / "state_dict.safetensors")))


def write_official_lisa(folder: Path, cfg: dict, state: dict, fmt: str = "bin") -> tuple[Path, Path]:
    """Lay the fixture out as a released LISA checkpoint: config.json + weights without CLIP keys + tokenizer,
    and CLIP in a folder of its own (as `openai/clip-vit-large-patch14` would be)."""
    ckpt, clip_dir = folder / "lisa", folder / "clip"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({**cfg["llm_config"], "architectures": ["LISAForCausalLM"],
                                                  "mm_vision_tower": str(clip_dir)}))
    weights = {k: v for k, v in state.items() if "vision_tower" not in k}
    if fmt == "bin":
        torch.save(weights, ckpt / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(weights, str(ckpt / "model.safetensors"))
    for f in (LISA_TINY / "tokenizer").iterdir():
        shutil.copy(f, ckpt / f.name)
    save_fixture_clip(cfg, state, clip_dir)
    return ckpt, clip_dir


def save_fixture_clip(cfg: dict, state: dict, clip_dir: Path) -> None:
    """The CLIP tower of an official parity fixture (keys ``model.vision_tower.vision_tower.*``) as a transformers
    folder of its own, as the real checkpoints' CLIP comes from its hub id."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip_cfg = {k: v for k, v in cfg["clip_vision_config"].items() if k not in ("architectures", "torch_dtype")}
    clip = CLIPVisionModel(CLIPVisionConfig(**clip_cfg))
    prefix = "model.vision_tower.vision_tower."
    clip_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = clip.state_dict()
    # transformers 5 keeps no `vision_model.` level; 4.x does.
    if not any(k.startswith("vision_model.") for k in own):
        clip_state = {k.removeprefix("vision_model."): v for k, v in clip_state.items()}
    clip.load_state_dict({k: v for k, v in clip_state.items() if k in own}, strict=True)
    clip.save_pretrained(str(clip_dir))


@pytest.fixture(scope="session")
def official_lisa_dir(tmp_path_factory, lisa_parity) -> Path:
    cfg, _, _, state = lisa_parity
    ckpt, _ = write_official_lisa(tmp_path_factory.mktemp("official"), cfg, state)
    return ckpt


@pytest.fixture(scope="session")
def parity_model(official_lisa_dir):
    from groundseg import load_model

    torch.manual_seed(0)
    return load_model(official_lisa_dir)

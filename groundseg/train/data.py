"""Training data: samples, the sources that make them, mixing by sample rate, and collation into a LisaBatch.

A *sample* is one image with one or more single-turn conversations about it (LISA puts up to three referring
expressions of one image in one sample, each its own conversation) and one ground-truth mask per ``[SEG]`` in
its answers, in order. Sources are random-access by a global sample index: sample ``k`` of a run is drawn from
``np.random.default_rng([seed, k])`` alone, so a resumed run sees exactly the samples the uninterrupted run
would have seen.

Sources:

* ``shapes`` -- the procedural shapes world (``datasets/shapes.py``), generated on the fly; tasks ``refer``
  (single-target expressions of every kind, answered with the target's name: "Sure, the blue square [SEG]."),
  ``multi`` (one ``[SEG]`` per object), ``objects`` (every object of the image named, one ``[SEG]`` each),
  ``caption`` (grounded caption) and ``box`` (``<ref>``/``<box>`` answers, no mask). Its samples also carry
  dense colour/shape/size labels for the optional attribute probes (``train/probes.py``).
* ``refer_seg`` -- REFER datasets on disk (RefCOCO/+/g, or shapes written by ``groundseg data shapes``).

LISA's ``--dataset sem_seg||refer_seg||vqa||reason_seg --sample_rates 9,3,3,1`` is written the same way here
(``MixedSource`` with rates); sources groundseg does not have yet are refused by name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from ..config import LisaConfig
from ..grounding.conversation import Conversation, PromptTokenizer, image_question
from ..grounding.lisa import LisaBatch, prepare_image
from ..grounding.tokens import BBOX, BOX_END, BOX_START, IGNORE_INDEX, SEG, count_seg
from ..io import InputError

# Question and answer wordings for referring segmentation (several, so the model does not learn one phrasing).
QUESTIONS = (
    "What is {} in this image? Please output segmentation mask.",
    "Can you segment {} in this image?",
    "Please segment {} in this image.",
    "Segment {}.",
    "Where is {}? Please respond with a segmentation mask.",
    "{}",
)
ANSWERS = ("[SEG].", "It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].")
# The shapes world answers with the phrase it segments, right before its [SEG] (config.SHAPES_ANSWER is the first).
GROUNDED_ANSWERS = ("Sure, {} [SEG].", "Sure, {} [SEG].", "{} [SEG].", "It is {} [SEG].")
MULTI_QUESTIONS = ("Segment {}.", "Please segment {} in this image.", "Can you segment {}?", "{}")
CAPTION_QUESTIONS = ("Describe the image and ground each object.",
                     "Please give a grounded caption of this image.")
BOX_SUFFIX = " Answer with a box."
OBJECTS_QUESTIONS = ("Segment every shape.", "Segment all the shapes in this image.", "What shapes are there?")
SHAPES_TASKS = ("refer", "multi", "objects", "caption", "box", "gcg", "regcap", "video", "video_keys")
VIDEO_KEY_FRAMES = 5  # video_keys: the frames kept of each clip, uniformly spaced (sa2va-shapes' key frames)
# Sa2VA video answers name the target (its shortest attribute description) before [SEG], as shapes-demo does.
VIDEO_ANSWER = "Sure, {} [SEG]."


def video_answer(name: str) -> str:
    return VIDEO_ANSWER.format(name)
# GLaMM tasks (models with a region encoder): "gcg" asks GLaMM's standard grounded-caption question and answers
# with "<p> phrase </p> [SEG]" per object; "regcap" asks about a <bbox> region and answers its description.


@dataclass
class TrainSample:
    """One image and its conversations. ``image`` (H, W, 3) uint8; ``masks`` (n, H, W) bool, one per ``[SEG]``
    across ``conversations`` in order; ``task`` names what made it (for logging)."""

    image: np.ndarray
    conversations: list[tuple[str, str]]
    masks: np.ndarray
    task: str = ""
    # Optional dense attribute labels for the auxiliary attribute loss (``train/probes.py``): (3, H, W) uint8, the
    # colour, shape and size class of the object seen at each pixel (0 = background), and (n, 3) the same classes
    # of each mask's object. Only the shapes world has them.
    attribute_map: np.ndarray | None = None
    mask_attributes: np.ndarray | None = None
    # Region prompts (GLaMM): per conversation, (n, 4) pixel xyxy boxes, one per <bbox> of its question, in order.
    boxes: list[np.ndarray] | None = None
    # ... and (shapes world) the (n, 3) colour/shape/size classes of each box's object, for the region probe.
    box_attributes: list[np.ndarray] | None = None
    # Videos (Sa2VA): the T frames, ``image`` is the first; ``masks`` is then (n, T, H, W).
    frames: list[np.ndarray] | None = None
    # Box answers: (n, H, W) masks (and (n, 3) attribute classes) of the object of each <box> across
    # ``conversations`` in order. Models with ``box_from_mask`` learn them on the state that predicts <box>;
    # the others do not use them.
    box_masks: np.ndarray | None = None
    box_mask_attributes: np.ndarray | None = None
    # Videos of the shapes world: (T, 3, H, W) uint8, ``attribute_map`` of every frame (Sa2VA's attribute probes).
    frame_attribute_maps: np.ndarray | None = None

    def __post_init__(self):
        n = sum(count_seg(a) for _, a in self.conversations)
        if n != len(self.masks):
            raise ValueError(f"sample ({self.task}) has {n} [SEG] in its answers but {len(self.masks)} masks")
        if self.box_masks is not None:
            n_box = sum(a.count(BOX_START) for _, a in self.conversations)
            if n_box != len(self.box_masks):
                raise ValueError(f"sample ({self.task}) has {n_box} <box> in its answers but {len(self.box_masks)} "
                                 "box masks")
        for k, (q, _) in enumerate(self.conversations):
            given = 0 if self.boxes is None else len(self.boxes[k])
            if q.count(BBOX) != given:
                raise ValueError(f"sample ({self.task}) conversation {k} has {q.count(BBOX)} <bbox> but {given} boxes")


class Source(Protocol):
    name: str

    def sample(self, rng: np.random.Generator) -> TrainSample: ...


# ---------------------------------------------------------------------------------------------- shapes

def _choose(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _labels(objects, masks: dict, shape: tuple[int, ...], mask_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Class maps (3, *shape) uint8 with each object's colour/shape/size class (1-based indices into ``COLORS``,
    ``SHAPES``, ``SIZES``; 0 = background) where ``masks[id]`` (``shape[1:]`` or ``shape``) is set, and (n, 3) the
    classes of the objects ``mask_ids``."""
    from ..datasets.shapes import COLORS, SHAPES, SIZES

    colors, shapes, sizes = list(COLORS), list(SHAPES), list(SIZES)
    amap = np.zeros((3, *shape), np.uint8)
    by_id = {}
    for o in objects:
        cls = (colors.index(o.color) + 1, shapes.index(o.shape) + 1, sizes.index(o.size) + 1)
        by_id[o.id] = cls
        for k in range(3):
            amap[k][masks[o.id]] = cls[k]
    return amap, np.array([by_id[i] for i in mask_ids], np.int64).reshape(-1, 3)


def video_attribute_labels(video, mask_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`attribute_labels` of each frame of a shapes-world video: (T, 3, H, W) uint8 and (n, 3) the classes
    of the objects ``mask_ids``. ``video.masks`` are already the visible parts (later ids drawn on top)."""
    amap, classes = _labels(video.objects, video.masks, (len(video.frames), *video.frames[0].shape[:2]), mask_ids)
    return amap.transpose(1, 0, 2, 3), classes


def attribute_labels(item, mask_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """A shapes-world image's dense attribute labels: (3, H, W) uint8 colour/shape/size class of the visible
    object at each pixel (1-based indices into ``COLORS``, ``SHAPES``, ``SIZES``; 0 = background), and (n, 3) the
    classes of the objects ``mask_ids``."""
    return _labels(item.objects, {o.id: o.mask for o in item.objects}, item.image.shape[:2], mask_ids)


@dataclass
class ShapesSource:
    """Samples from the procedural shapes world, generated on the fly (image index drawn per sample).

    ``tasks`` maps task -> rate among ``refer``, ``multi``, ``objects``, ``caption``, ``box``."""

    seed: int = 0
    image_size: int = 256
    tasks: dict[str, float] = field(default_factory=lambda: {"refer": 6, "multi": 2, "caption": 1, "box": 2})
    max_expressions: int = 3
    num_images: int = 10_000_000
    video_frames: int = 16
    # Expression kinds that referring and video questions are drawn from (None: all). "attribute" alone gives
    # answers that repeat the question's name: a first stage in which a from-scratch LLM learns to copy.
    kinds: tuple[str, ...] | None = None
    name: str = "shapes"

    def __post_init__(self):
        from ..datasets.shapes import EXPRESSION_KINDS, ShapesWorld

        unknown = set(self.tasks) - set(SHAPES_TASKS)
        if unknown:
            raise InputError(f"shapes tasks: unknown {sorted(unknown)}; expected {', '.join(SHAPES_TASKS)}")
        if any(r < 0 for r in self.tasks.values()) or sum(self.tasks.values()) <= 0:
            raise InputError(f"shapes task rates must be >= 0 with a positive sum, got {self.tasks}")
        known = set(EXPRESSION_KINDS) | {"motion"}
        if self.kinds is not None and (not self.kinds or set(self.kinds) - known):
            raise InputError(f"--shapes-kinds {','.join(self.kinds)}: expected kinds among {', '.join(sorted(known))}")
        self.world = ShapesWorld(seed=self.seed, image_size=self.image_size)
        self._names = list(self.tasks)
        p = np.array([self.tasks[t] for t in self._names], dtype=np.float64)
        self._p = p / p.sum()

    def sample(self, rng: np.random.Generator) -> TrainSample:
        # Draw until the image supports the task (most do; an image of one object has no multi-target answer).
        task = self._names[int(rng.choice(len(self._names), p=self._p))]
        for _ in range(64):
            item = None if task.startswith("video") else self.world.image(int(rng.integers(self.num_images)))
            out = getattr(self, f"_{task}")(item, rng)
            if out is not None:
                return out
        raise RuntimeError(f"shapes: no image supported task {task!r} in 64 draws")

    @staticmethod
    def _masks(item, ids: list[int]) -> np.ndarray:
        by_id = {o.id: o for o in item.objects}
        if not ids:
            return np.zeros((0, *item.image.shape[:2]), bool)
        return np.stack([by_id[i].mask for i in ids])

    def _sample(self, item, convs, ids: list[int], task: str) -> TrainSample:
        amap, mattr = attribute_labels(item, ids)
        return TrainSample(item.image, convs, self._masks(item, ids), task, amap, mattr)

    def _refer(self, item, rng) -> TrainSample | None:
        # The answer names the target by its shortest unique attribute description, whatever the question's kind
        # ("the square left of the green star" -> "Sure, the blue square [SEG]."), so the state before [SEG] is
        # always that of the target's own noun: the LLM resolves the reference (learnt through CE), the mask
        # decoder only ever maps a name to its object. Echoing the question instead puts the *anchor's* noun
        # ("star") before [SEG] in relational expressions and teaches the decoder the opposite of what
        # attribute expressions teach. Targets without a unique name (exact duplicates) are left out.
        names = self._names_for(item)
        single = [e for e in item.expressions
                  if e.kind != "multi" and (e.kind == "attribute" or e.targets[0] in names) and self._kind_ok(e)]
        if not single:
            return None
        pick = rng.permutation(len(single))[: self.max_expressions]
        convs, ids = [], []
        for j in pick:
            e = single[int(j)]
            name = e.text if e.kind == "attribute" else names[e.targets[0]]
            convs.append((_choose(rng, QUESTIONS).format(e.text), _choose(rng, GROUNDED_ANSWERS).replace("{}", name)))
            ids.append(e.targets[0])
        return self._sample(item, convs, ids, "refer")

    def _kind_ok(self, e) -> bool:
        return self.kinds is None or e.kind in self.kinds

    @staticmethod
    def _names_for(item) -> dict[int, str]:
        """The shortest attribute expression of each object (its name inside multi-target answers)."""
        names: dict[int, str] = {}
        for e in item.expressions:
            if e.kind == "attribute" and (e.targets[0] not in names or len(e.text) < len(names[e.targets[0]])):
                names[e.targets[0]] = e.text
        return names

    def _multi(self, item, rng) -> TrainSample | None:
        multi = [e for e in item.expressions if e.kind == "multi"]
        if not multi:
            return None
        e = multi[int(rng.integers(len(multi)))]
        names = self._names_for(item)
        by_id = {o.id: o for o in item.objects}
        parts = [f"{names.get(i) or f'the {by_id[i].color} {by_id[i].shape}'} {SEG}" for i in e.targets]
        answer = f"Sure, {_join(parts)}."
        return self._sample(item, [(_choose(rng, MULTI_QUESTIONS).format(e.text), answer)], list(e.targets), "multi")

    def _objects(self, item, rng) -> TrainSample | None:
        # Every object that has a unique name, in the grounded caption's order: the most masks per LLM pass of any
        # task.
        from ..datasets.shapes import listing_key

        names = self._names_for(item)
        objs = sorted((o for o in item.objects if o.id in names), key=listing_key)
        if not objs:
            return None
        answer = f"Sure, {_join([f'{names[o.id]} {SEG}' for o in objs])}."
        return self._sample(item, [(_choose(rng, OBJECTS_QUESTIONS), answer)], [o.id for o in objs], "objects")

    def _caption(self, item, rng) -> TrainSample | None:
        if not item.caption_targets:
            return None
        return self._sample(item, [(_choose(rng, CAPTION_QUESTIONS), item.caption + ".")],
                            list(item.caption_targets), "caption")

    def _gcg(self, item, rng) -> TrainSample | None:
        from ..config import GLAMM_GCG_PROMPT

        if not item.caption_targets:
            return None
        # GLaMM's target form: "<p> phrase </p> [SEG]" with spaces inside the tags.
        answer = item.caption.replace("<p>", "<p> ").replace("</p>", " </p>") + "."
        return self._sample(item, [(GLAMM_GCG_PROMPT, answer)], list(item.caption_targets), "gcg")

    def _regcap(self, item, rng) -> TrainSample | None:
        if not item.region_questions:
            return None
        picks = rng.permutation(len(item.region_questions))[: self.max_expressions]
        qs = [item.region_questions[int(j)] for j in picks]
        amap, boxed = attribute_labels(item, [q.target for q in qs])
        return TrainSample(item.image, [(q.question, q.answer) for q in qs], self._masks(item, []), "regcap", amap,
                           boxed[:0], boxes=[np.asarray([q.box], np.float32) for q in qs],
                           box_attributes=[boxed[k:k + 1] for k in range(len(qs))])

    def _video(self, item, rng, keys_only: bool = False) -> TrainSample | None:
        # One expression of a moving-shapes video (attribute or motion), answered with the target's name; the
        # image drawn for the task only seeds the video's index. Videos come from the world's video stream.
        from ..grounding.sa2va import segment_question, select_key_frames

        video = self.world.video(int(rng.integers(self.num_images)), self.video_frames)
        if keys_only:
            keep = select_key_frames(len(video.frames), "uniform", VIDEO_KEY_FRAMES)
            video = dataclasses.replace(video, frames=[video.frames[t] for t in keep],
                                        masks={k: m[keep] for k, m in video.masks.items()})
        names = self._names_for(video)
        usable = [e for e in video.expressions if len(e.targets) == 1 and e.targets[0] in names and self._kind_ok(e)]
        if not usable:
            return None
        # Up to max_expressions expressions about different objects, one conversation turn each (as Sa2VA's video
        # referring data is): each clip then teaches SAM2 to tell its objects apart, not only object from
        # background.
        turns, targets = [], []
        for j in rng.permutation(len(usable)):
            e = usable[int(j)]
            if e.targets[0] in targets or len(targets) == self.max_expressions:
                continue
            # An attribute expression already names its target uniquely and is echoed, as image answers do (the
            # LLM copies it); a motion expression is answered with the target's name, which the LLM must find by
            # watching the key frames.
            name = e.text if e.kind == "attribute" else names[e.targets[0]]
            question = segment_question(e.text)
            turns.append((question if not turns else question.replace("<image>\n", "", 1), video_answer(name)))
            targets.append(e.targets[0])
        masks = np.stack([video.masks[t] for t in targets])  # (n, T, H, W)
        amaps, mattr = video_attribute_labels(video, targets)
        return TrainSample(video.frames[0], turns, masks, "video", amaps[0], mattr, frames=list(video.frames),
                           frame_attribute_maps=amaps)

    def _video_keys(self, item, rng) -> TrainSample | None:
        # The same question on only the clip's 5 uniformly spaced key frames (what a uniform-key-frame Sa2VA's
        # MLLM sees of it at inference), each one a conditioning frame: a fifth of SAM2's work per sample, for
        # the stage that teaches the MLLM to tell motions apart (the expression still describes the whole clip).
        return self._video(item, rng, keys_only=True)

    def _box(self, item, rng) -> TrainSample | None:
        # Up to max_expressions box questions about the image (one conversation each), with each box's object mask
        # for box_from_mask models.
        if not item.box_answers:
            return None
        picks = rng.permutation(len(item.box_answers))[: self.max_expressions]
        answers = [item.box_answers[int(j)] for j in picks]
        convs = [(b.question if b.question.endswith(BOX_SUFFIX.strip()) else b.question + BOX_SUFFIX, b.answer)
                 for b in answers]
        amap, box_attr = attribute_labels(item, [b.target for b in answers])
        return TrainSample(item.image, convs, self._masks(item, []), "box", amap, box_attr[:0],
                           box_masks=self._masks(item, [b.target for b in answers]), box_mask_attributes=box_attr)


# ---------------------------------------------------------------------------------------------- REFER on disk

@dataclass
class ReferSource:
    """LISA's ``refer_seg``: an image of the split, up to ``max_expressions`` of its sentences (distinct refs)."""

    data_root: str
    dataset: str = "refcoco"
    split_by: str = "unc"
    split: str = "train"
    image_dir: str | None = None
    max_expressions: int = 3
    name: str = "refer_seg"

    def __post_init__(self):
        from ..datasets.refer import load_refer

        self.refer = load_refer(self.data_root, self.dataset, self.split_by)
        by_image: dict[int, list] = {}
        for ref in self.refer.refs_for_split(self.split):
            by_image.setdefault(ref["image_id"], []).append(ref)
        if not by_image:
            raise InputError(f"{self.data_root}/{self.dataset}: no refs in split {self.split!r}")
        self.image_ids = sorted(by_image)
        self.by_image = by_image
        self.images = Path(self.image_dir) if self.image_dir else Path(self.data_root) / "images"
        if not self.images.is_dir():
            raise InputError(f"REFER image folder not found: {self.images} (pass --image-dir)")

    def sample(self, rng: np.random.Generator) -> TrainSample:
        from ..io import load_image

        image_id = self.image_ids[int(rng.integers(len(self.image_ids)))]
        refs = self.by_image[image_id]
        info = self.refer.images[image_id]
        rgb = load_image(self.images / info["file_name"])
        convs, masks = [], []
        for j in rng.permutation(len(refs))[: self.max_expressions]:
            ref = refs[int(j)]
            sent = ref["sentences"][int(rng.integers(len(ref["sentences"])))]
            convs.append((_choose(rng, QUESTIONS).format(sent["sent"]), _choose(rng, ANSWERS)))
            masks.append(self.refer.mask(ref))
        return TrainSample(rgb, convs, np.stack(masks), "refer_seg")


KNOWN_SOURCES = ("shapes", "refer_seg")
PLANNED_SOURCES = ("sem_seg", "vqa", "reason_seg")


@dataclass
class MixedSource:
    """Pick a source by ``rates`` (LISA's ``sample_rates``), then a sample from it; sample ``k`` depends only on
    ``(seed, k)``."""

    sources: list
    rates: list[float]
    seed: int = 0

    def __post_init__(self):
        if len(self.sources) != len(self.rates):
            raise InputError(f"{len(self.sources)} datasets but {len(self.rates)} sample rates")
        if any(r <= 0 for r in self.rates):
            raise InputError(f"sample rates must be positive, got {self.rates}")
        p = np.asarray(self.rates, dtype=np.float64)
        self._p = p / p.sum()

    def __getitem__(self, k: int) -> TrainSample:
        rng = np.random.default_rng([self.seed, int(k)])
        src = self.sources[int(rng.choice(len(self.sources), p=self._p))]
        return src.sample(rng)


# ---------------------------------------------------------------------------------------------- collation

class Collator:
    """Samples -> :class:`LisaBatch`: both encoders' pixel inputs, right-padded ids with labels on the answer
    tokens only (the system prompt, the question and the image are ``IGNORE_INDEX``), masks as float tensors.

    Holds only the config and tokenizer, so DataLoader workers can run it."""

    def __init__(self, config: LisaConfig, tokenizer):
        self.config = config
        self.prompt_tokenizer = PromptTokenizer(tokenizer, config.tokenization)
        self.conversation = Conversation(config.system)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        self.eos_id = tokenizer.eos_token_id
        self.box_ids = None
        if config.box_from_mask:
            from ..grounding.tokens import token_id
            self.box_ids = (token_id(tokenizer, BOX_START), token_id(tokenizer, BOX_END))

    def _prompt_masks(self, s: TrainSample) -> tuple[np.ndarray, np.ndarray | None]:
        """The masks (and attribute classes) of a sample's mask-decoder prompts in text order: its [SEG]s, and
        with ``box_from_mask`` its <box>es too, interleaved as they occur in the answers."""
        if not self.config.box_from_mask or s.box_masks is None or not len(s.box_masks):
            return s.masks, s.mask_attributes
        order, n_seg, n_box = [], 0, 0
        for _, a in s.conversations:
            for m in re.finditer(re.escape(SEG) + "|" + re.escape(BOX_START), a):
                if m.group() == SEG:
                    order.append(("seg", n_seg))
                    n_seg += 1
                else:
                    order.append(("box", n_box))
                    n_box += 1
        masks = np.stack([s.masks[i] if kind == "seg" else s.box_masks[i] for kind, i in order])
        attrs = None
        if s.mask_attributes is not None and s.box_mask_attributes is not None:
            attrs = np.stack([s.mask_attributes[i] if kind == "seg" else s.box_mask_attributes[i]
                              for kind, i in order])
        return masks, attrs

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """One conversation -> (ids, labels). The prompt is tokenised exactly as at inference (an open assistant
        turn) and the answer is appended after it, so training and generation see the same prefix ids."""
        template = getattr(self.config, "image_prefix", "{image}\n")  # GLaMM's first-turn wording
        prefix = self.conversation.prompt([(image_question(question, self.config.use_im_start_end, template), None)])
        prompt_ids = self.prompt_tokenizer(prefix)
        answer_ids = self.prompt_tokenizer.encode_chunk(" " + answer) + [self.eos_id]
        labels = list(answer_ids)
        if self.box_ids is not None:  # box_from_mask: coordinates are written from the mask, not predicted
            inside = False
            for k, t in enumerate(answer_ids):
                if inside:
                    labels[k] = IGNORE_INDEX
                    inside = t != self.box_ids[1]
                elif t == self.box_ids[0]:
                    inside = True
        return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + labels

    def __call__(self, samples: list[TrainSample]) -> LisaBatch:
        if any(s.frames is not None for s in samples):
            raise InputError("video samples (shapes task 'video') need a video model (the sa2va family)")
        ids, labels, offset, region_boxes = [], [], [0], []
        clip, sam, in_sizes, orig_sizes, gts = [], [], [], [], []
        prompt_masks = [self._prompt_masks(s) for s in samples]  # (masks, attributes) in prompt order
        for s, (masks, _) in zip(samples, prompt_masks):
            prep = prepare_image(s.image, self.config)
            clip.append(prep.clip)
            sam.append(prep.sam)
            in_sizes.append(prep.input_size)
            orig_sizes.append(prep.original_size)
            gts.append(torch.from_numpy(np.asarray(masks, dtype=np.float32)))
            h, w = prep.original_size
            for k, (q, a) in enumerate(s.conversations):
                i, lab = self.encode(q, a)
                ids.append(i)
                labels.append(lab)
                boxes = s.boxes[k] if s.boxes is not None else None
                region_boxes.append(None if boxes is None or not len(boxes) else
                                    torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
                                    / torch.tensor([w, h, w, h], dtype=torch.float32))
            offset.append(len(ids))
        length = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        label_t = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.long)
        for r, (i, lab) in enumerate(zip(ids, labels)):
            input_ids[r, :len(i)] = torch.tensor(i)
            label_t[r, :len(lab)] = torch.tensor(lab)
        batch = LisaBatch(input_ids=input_ids, labels=label_t, clip_pixel_values=torch.stack(clip),
                          sam_pixel_values=torch.stack(sam), offset=torch.tensor(offset),
                          input_sizes=in_sizes, original_sizes=orig_sizes, gt_masks=gts,
                          region_boxes=region_boxes if any(b is not None for b in region_boxes) else None)
        if all(s.attribute_map is not None for s in samples):
            grid = 4 * self.config.sam.embedding_size  # SAM's low-resolution mask grid
            batch.attribute_maps = torch.stack([
                torch.from_numpy(grid_labels(s.attribute_map, size, self.config.sam.image_size, grid))
                for s, size in zip(samples, in_sizes)])
            batch.mask_attributes = torch.from_numpy(np.concatenate(
                [np.asarray(attrs, np.int64).reshape(-1, 3) for _, attrs in prompt_masks]))
            g = int(round(self.config.vision.image_size / int(self.config.vision.clip["patch_size"])))
            batch.token_attribute_maps = torch.stack([torch.from_numpy(crop_grid_labels(s.attribute_map, g))
                                                      for s in samples])
        boxed = [s for s in samples if s.boxes is not None and any(len(b) for b in s.boxes)]
        if boxed and all(s.box_attributes is not None for s in boxed):  # in region-vector order: rows, then boxes
            batch.region_attributes = torch.from_numpy(np.concatenate(
                [np.asarray(a, np.int64).reshape(-1, 3) for s in boxed for a in s.box_attributes if len(a)]))
        return batch


def grid_labels(amap: np.ndarray, input_size: tuple[int, int], image_size: int, grid: int) -> np.ndarray:
    """(C, H, W) class labels -> (C, grid, grid) int64 on SAM's low-resolution grid (nearest pixel centre): the
    image occupies the top-left ``input_size`` of SAM's ``image_size`` square; the padding is ``IGNORE_INDEX``."""
    c, h0, w0 = amap.shape
    gh = max(1, round(input_size[0] * grid / image_size))
    gw = max(1, round(input_size[1] * grid / image_size))
    ys = np.minimum(((np.arange(gh) + 0.5) * h0 / gh).astype(np.int64), h0 - 1)
    xs = np.minimum(((np.arange(gw) + 0.5) * w0 / gw).astype(np.int64), w0 - 1)
    out = np.full((c, grid, grid), IGNORE_INDEX, np.int64)
    out[:, :gh, :gw] = amap[:, ys][:, :, xs]
    return out


def frame_grid_labels(amap: np.ndarray, grid: int) -> np.ndarray:
    """(..., C, H, W) class labels -> (..., C, grid, grid) int64 for a model that resizes the whole frame to a square
    (Sa2VA: SAM2's input and the MLLM's video frame tile): each cell takes the label of its centre pixel."""
    h, w = amap.shape[-2:]
    ys = np.minimum(((np.arange(grid) + 0.5) * h / grid).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(grid) + 0.5) * w / grid).astype(np.int64), w - 1)
    return amap[..., ys, :][..., xs].astype(np.int64)


def crop_grid_labels(amap: np.ndarray, grid: int) -> np.ndarray:
    """(C, H, W) class labels -> (C, grid, grid) int64 at the centres of the vision tower's patches: the tower sees
    the centre square of side min(H, W) (:func:`~groundseg.grounding.lisa.clip_preprocess`), split in
    ``grid`` x ``grid`` patches; each patch takes the label of its centre pixel."""
    _, h, w = amap.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    centres = np.minimum(((np.arange(grid) + 0.5) * side / grid).astype(np.int64), side - 1)
    return amap[:, top + centres][:, :, left + centres].astype(np.int64)


def build_source(spec: str, rates: Sequence[float] | None, seed: int, data_root: str | None = None,
                 refer_datasets: str = "refcoco", shapes_tasks: dict[str, float] | None = None,
                 image_size: int = 256, max_expressions: int = 3, image_dir: str | None = None,
                 video_frames: int = 16, shapes_kinds: Sequence[str] | None = None) -> MixedSource:
    """``spec`` is LISA's ``a||b||c`` dataset list; ``rates`` its sample rates (default equal)."""
    names = [n.strip() for n in spec.split("||") if n.strip()]
    if not names:
        raise InputError("--dataset is empty: expected e.g. 'shapes' or 'refer_seg||shapes'")
    rates = list(rates) if rates else [1.0] * len(names)
    if len(rates) != len(names):
        raise InputError(f"{len(names)} datasets but {len(rates)} sample rates")
    sources = []
    for n in names:
        if n == "shapes":
            sources.append(ShapesSource(seed=seed, image_size=image_size, max_expressions=max_expressions,
                                        video_frames=video_frames,
                                        kinds=tuple(shapes_kinds) if shapes_kinds else None,
                                        **({"tasks": shapes_tasks} if shapes_tasks else {})))
        elif n == "refer_seg":
            if not data_root:
                raise InputError("--dataset refer_seg needs --data-root (the folder holding refcoco/, images/)")
            for d in refer_datasets.split("||"):
                split_by = {"refcocog": "umd", "refclef": "unc"}.get(d, "unc")
                sources.append(ReferSource(data_root, d, split_by, image_dir=image_dir))
            if len(refer_datasets.split("||")) > 1:  # the refer rate is shared among its datasets
                k = len(names) and names.index(n)
                share = rates[k] / len(refer_datasets.split("||"))
                rates = rates[:k] + [share] * len(refer_datasets.split("||")) + rates[k + 1:]
        elif n in PLANNED_SOURCES:
            raise InputError(f"--dataset {n}: not available in this version of groundseg "
                             f"(available: {', '.join(KNOWN_SOURCES)})")
        else:
            raise InputError(f"--dataset {n}: unknown; expected one of {', '.join(KNOWN_SOURCES)}")
    return MixedSource(sources, rates, seed)

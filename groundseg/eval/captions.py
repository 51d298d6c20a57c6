"""Caption metrics as the GLaMM evaluations compute them: METEOR and CIDEr from ``pycocoevalcap``.

The official scripts run ``COCOEvalCap``, which tokenises both sides with the Stanford PTB tokenizer (Java) and
then scores BLEU, METEOR (Java), ROUGE-L, CIDEr and SPICE (Java, downloads Stanford models on first use). We call
the same tokenizer and the same METEOR and CIDEr scorers directly, which gives the same two numbers without
SPICE's download. Both need ``pip install pycocoevalcap`` and a ``java`` on the PATH; :func:`caption_metrics`
raises :class:`CaptionMetricsUnavailable` (one line) when either is missing, and the runners then report the
caption metrics as null with that reason instead of failing the whole evaluation.
"""

from __future__ import annotations

import contextlib
import io
import shutil


class CaptionMetricsUnavailable(RuntimeError):
    """pycocoevalcap or Java is missing."""


def caption_backend() -> str:
    """A one-line description of the scorer, e.g. for ``report.json``."""
    return "pycocoevalcap 1.2 (PTBTokenizer, Meteor 1.5, CIDEr-D)"


def caption_metrics(references: dict, candidates: dict) -> dict[str, float]:
    """Corpus METEOR and CIDEr.

    Args:
        references: ``{key: [reference caption, ...]}``.
        candidates: ``{key: candidate caption}`` for the same keys (already cleaned of grounding markup).
    Returns:
        ``{"METEOR": m, "CIDEr": c}`` as pycocoevalcap computes them (fractions; CIDEr is not bounded by 1).
    """
    if set(references) != set(candidates):
        missing = sorted(set(references) ^ set(candidates), key=str)[:3]
        raise ValueError(f"references and candidates cover different keys, e.g. {missing}")
    if not references:
        raise ValueError("no captions to score")
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise CaptionMetricsUnavailable("METEOR/CIDEr need pycocoevalcap (pip install pycocoevalcap)") from None
    if shutil.which("java") is None:
        raise CaptionMetricsUnavailable("METEOR/CIDEr need Java on the PATH (pycocoevalcap runs the PTB tokenizer "
                                        "and METEOR 1.5 as Java programs)")
    keys = sorted(references, key=str)
    index = {k: i for i, k in enumerate(keys)}  # the scorers want sortable, hashable ids
    gts = {index[k]: [{"caption": c} for c in references[k]] for k in keys}
    res = {index[k]: [{"caption": candidates[k]}] for k in keys}
    with contextlib.redirect_stdout(io.StringIO()), _quiet_stderr_fd():
        tok = PTBTokenizer()
        gts, res = tok.tokenize(gts), tok.tokenize(res)
        meteor = Meteor()
        m, _ = meteor.compute_score(gts, res)
        del meteor  # its __del__ stops the Java process now rather than at exit
        c, _ = Cider().compute_score(gts, res)
    return {"METEOR": float(m), "CIDEr": float(c)}


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 (the Java tokenizer's progress line goes straight to it, not via sys.stderr)."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)

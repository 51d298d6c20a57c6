"""groundseg: language-guided grounding and segmentation (LISA, GLaMM, Sa2VA) on current libraries."""

__version__ = "0.1.0"

from .hub import CheckpointError, load_model, save_pretrained  # noqa: E402
from .io import InputError  # noqa: E402
from .result import Result  # noqa: E402

__all__ = ["__version__", "load_model", "save_pretrained", "Result", "InputError", "CheckpointError"]

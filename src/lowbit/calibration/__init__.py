"""Text for calibration and evaluation, split so the two never overlap."""

from lowbit.calibration.text import TextSplit, load_text, load_text_or_pydoc, split_text
from lowbit.calibration.windows import calibration_batches, eval_windows

__all__ = ["TextSplit", "load_text", "load_text_or_pydoc", "split_text", "calibration_batches", "eval_windows"]

"""The paper's evaluation protocols: detector (COCOeval / LVISEval AP) and prompt (mIoU, top-1 Acc)."""

from ovsam_model.eval.detector import evaluate_detections
from ovsam_model.eval.prompt import centre_point, evaluate_prompts, mask_iou
from ovsam_model.eval.report import DetectorResult, PromptResult

__all__ = [
    "DetectorResult",
    "PromptResult",
    "centre_point",
    "evaluate_detections",
    "evaluate_prompts",
    "mask_iou",
]

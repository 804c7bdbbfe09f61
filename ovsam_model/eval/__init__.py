"""The evaluation protocols: detector (COCOeval / LVISEval AP), prompt (mIoU, top-1 Acc) and
proposals (class-agnostic AR, the SAM paper's zero-shot object proposals)."""

from ovsam_model.eval.detector import evaluate_detections
from ovsam_model.eval.prompt import centre_point, evaluate_prompts, mask_iou
from ovsam_model.eval.proposals import evaluate_proposals
from ovsam_model.eval.report import DetectorResult, PromptResult, ProposalResult

__all__ = [
    "DetectorResult",
    "PromptResult",
    "ProposalResult",
    "centre_point",
    "evaluate_detections",
    "evaluate_prompts",
    "evaluate_proposals",
    "mask_iou",
]

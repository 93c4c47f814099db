"""`evaluate` module for RES cIoU / gIoU; load it offline with `evaluate.load(metrics.module_path("res_iou"))`.

The maths lives in `perceptiongpt.processing.metrics`; this file only declares the input features. Masks travel
as nested lists of bools (the arrow features need a fixed type), so very large evaluations are faster with the
plain function `res_iou`.
"""

import datasets
import evaluate

from perceptiongpt.processing.metrics import res_iou


_CITATION = """@inproceedings{pi2024perceptiongpt,
  title={PerceptionGPT: Effectively Fusing Visual Perception into LLM},
  author={Pi, Renjie and Yao, Lewei and Gao, Jiahui and Zhang, Jipeng and Zhang, Tong},
  booktitle={CVPR},
  year={2024}
}"""

_INPUTS = """
Args:
    predictions: one bool (H, W) mask or None (no `<vis>` generated) per expression.
    references: one ground-truth bool (H, W) mask per expression, at the prediction's size.
Returns:
    {"ciou", "giou", "n"}: cIoU = sum(intersection) / sum(union); gIoU = mean per-sample IoU (empty union -> 1,
    None -> 0).
"""


class ResIou(evaluate.Metric):
    def _info(self):
        mask = datasets.Sequence(datasets.Sequence(datasets.Value("bool")))
        return evaluate.MetricInfo(
            description="RES cumulative IoU (cIoU) and mean per-sample IoU (gIoU) on bool masks.",
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": mask, "references": mask}),
        )

    def _compute(self, predictions, references):
        return res_iou(predictions, references)

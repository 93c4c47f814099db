"""`evaluate` module for REC accuracy; load it offline with `evaluate.load(metrics.module_path("rec_accuracy"))`.

The maths lives in `perceptiongpt.processing.metrics`; this file only declares the input features.
"""

import datasets
import evaluate

from perceptiongpt.processing.metrics import rec_accuracy


_CITATION = """@inproceedings{pi2024perceptiongpt,
  title={PerceptionGPT: Effectively Fusing Visual Perception into LLM},
  author={Pi, Renjie and Yao, Lewei and Gao, Jiahui and Zhang, Jipeng and Zhang, Tong},
  booktitle={CVPR},
  year={2024}
}"""

_INPUTS = """
Args:
    predictions: one pixel xyxy box [x1, y1, x2, y2] or None (no `<vis>` generated) per expression.
    references: one ground-truth pixel xyxy box per expression.
    strict_greater: count a hit at IoU > t (the Shikra-family papers) instead of IoU >= t. Default False.
Returns:
    {"acc@0.5", "acc@0.75", "miou", "n"}.
"""


class RecAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="REC accuracy at IoU 0.5 / 0.75 and mean IoU on pixel xyxy boxes; None counts as IoU 0.",
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, predictions, references, strict_greater=False):
        return rec_accuracy(predictions, references, strict_greater=strict_greater)

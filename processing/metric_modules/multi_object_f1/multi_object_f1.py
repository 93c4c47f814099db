"""`evaluate` module for multi-object F1; load it offline with `evaluate.load(metrics.module_path("multi_object_f1"))`.

The maths lives in `perceptiongpt.processing.metrics`; this file only declares the input features.
"""

import datasets
import evaluate

from perceptiongpt.processing.metrics import multi_object_f1


_CITATION = """@inproceedings{pi2024perceptiongpt,
  title={PerceptionGPT: Effectively Fusing Visual Perception into LLM},
  author={Pi, Renjie and Yao, Lewei and Gao, Jiahui and Zhang, Jipeng and Zhang, Tong},
  booktitle={CVPR},
  year={2024}
}"""

_INPUTS = """
Args:
    predictions: per sample, a list of pixel xyxy boxes (empty or None when nothing was generated).
    references: per sample, a list of ground-truth pixel xyxy boxes.
    iou: the IoU a Hungarian-matched pair needs to count as a true positive. Default 0.5.
Returns:
    {"precision", "recall", "f1", "n"}, micro-averaged over samples.
"""


class MultiObjectF1(evaluate.Metric):
    def _info(self):
        boxes = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
        return evaluate.MetricInfo(
            description="Multi-object precision / recall / F1 after Hungarian matching of pixel xyxy boxes.",
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": boxes, "references": boxes}),
        )

    def _compute(self, predictions, references, iou=0.5):
        return multi_object_f1(predictions, references, iou=iou)

"""GLUE's metrics as an evaluate module, written here so that it loads offline: `evaluate.load(<this file>, task)`.

glue_bert.py loads it by path (its --metric default), adds each evaluation batch with `add_batch` and reads the
figures with `compute`, as accelerate's and transformers' GLUE examples do with the Hub's "glue" metric, whose
configurations and keys these are. Any other evaluate metric takes its place with `--metric NAME_OR_PATH`.

    accuracy                          every task
    f1 (of class 1) and accuracy      mrpc, qqp
    matthews_correlation              cola
    pearson and spearmanr             stsb (predictions are scores)
    accuracy                          mnli, mnli_matched, mnli_mismatched, qnli, rte, sst2, wnli
"""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli")

INPUTS = """
Args:
    predictions: class ids (a score for stsb), one per example.
    references: gold class ids (a score for stsb).
Returns: a dict of the task's metrics: accuracy, f1, matthews_correlation, pearson, spearmanr.
Example:
    >>> metric = evaluate.load("recipes/glue_metric.py", "mrpc")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'f1': 0.6666666666666666, 'accuracy': 0.6666666666666666}
"""


class GlueMetric(evaluate.Metric):
    def _info(self):
        if self.config_name not in TASKS:
            raise KeyError(f"no GLUE task {self.config_name!r}: choose one of {', '.join(TASKS)}")
        value = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description="GLUE's metrics (Wang et al. 2019), computed with scikit-learn and scipy.",
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for NLU, ICLR 2019.",
            inputs_description=INPUTS,
            features=datasets.Features({"predictions": datasets.Value(value), "references": datasets.Value(value)}),
            format="numpy",
        )

    def _compute(self, predictions, references):
        if self.config_name == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        if self.config_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        accuracy = float(accuracy_score(references, predictions))
        if self.config_name in ("mrpc", "qqp"):
            return {"f1": float(f1_score(references, predictions, pos_label=1, zero_division=0)), "accuracy": accuracy}
        return {"accuracy": accuracy}

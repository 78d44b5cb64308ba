"""The MLflow pyfunc, logged as code ("models from code"): the registry stores this file and the
model bundle (safetensors + JSON + parquet vocabularies), never a pickled Python object.

It scores raw feature columns with `recsys_moe.scoring.Scorer`, the same path as batch scoring
and the online endpoint, and returns one column per task.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel


class RankerPyfunc(PythonModel):
    def load_context(self, context: Any) -> None:
        from recsys_moe.scoring import Scorer

        self.scorer = Scorer(context.artifacts["bundle"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import polars as pl

        from recsys_moe.scoring.scorer import first_reject

        scored = self.scorer.score(pl.from_pandas(model_input))
        problem = first_reject(scored)
        if problem is not None:
            raise MlflowException.invalid_parameter_value(problem)
        return pd.DataFrame(scored.scores, columns=self.scorer.tasks)


mlflow.models.set_model(RankerPyfunc())

"""Log a trained model bundle as an MLflow pyfunc, and get a bundle back from a model URI.

The logged model carries the bundle (weights, model config, manifest, vocabularies) as an
artifact, a signature over the raw feature columns, an input example of real rows, and what stock
MLflow needs to serve it from a fresh environment: the `recsys_moe` code and requirements that
pip can install (`registry.environment`). Loading needs only JSON, parquet and safetensors:
nothing is unpickled.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import polars as pl
import yaml

from recsys_moe import atomic
from recsys_moe.registry import environment
from recsys_moe.scoring import Scorer
from recsys_moe.tracking.store import tracking_uri as default_tracking_uri

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name within its run
CODE = Path(__file__).with_name("pyfunc_model.py")


def log_model(
    bundle_dir: Path,
    run_id: str,
    example: pl.DataFrame | None = None,
    *,
    registered_name: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Log `bundle_dir` as run `run_id`'s pyfunc model; returns its model URI (`models:/<id>`).

    `example`: a few raw rows (holdout rows are ideal), logged as the input example; the
    signature names the input columns and the per-task outputs. Its input columns are typed
    `any`: the types a column may arrive in, and the rows refused, are the input contract's
    (`pipelines.coerce`, the same in every scoring path), not MLflow's own casting rules. With
    `registered_name` a new registry version is created too (the gate decides on aliases).
    """
    import mlflow
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    scorer = Scorer(bundle_dir)
    inputs = None
    signature = None
    if example is not None:
        # Dense columns as floats: an integer column in a signature rejects the nulls dense features allow.
        dense = {f.source_column for f in scorer.spec.dense_features}
        inputs = example.head(5).select(
            pl.col(c).cast(pl.Float64) if c in dense and example.schema[c].is_integer() else pl.col(c)
            for c in scorer.input_columns
        )
        outputs = pl.DataFrame(scorer.score(inputs).scores, schema=scorer.tasks).to_pandas()
        signature = ModelSignature(
            inputs=Schema([ColSpec(AnyType(), c) for c in scorer.input_columns]),
            outputs=infer_signature(outputs, outputs).outputs,
        )
    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        artifacts = {"bundle": str(bundle_dir)}
        wheels = None
        if environment.uses_stand_in():
            folder = Path(tmp) / environment.WHEELS_ARTIFACT
            folder.mkdir()
            environment.fbgemm_cpu_shim(folder)
            artifacts[environment.WHEELS_ARTIFACT] = str(folder)
            wheels = Path("artifacts") / folder.name  # where MLflow puts it, relative to the model
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(CODE),
            artifacts=artifacts,
            code_paths=[str(environment.package_code(Path(tmp)))],
            signature=signature,
            input_example=inputs.to_pandas() if inputs is not None else None,
            pip_requirements=environment.requirements(wheels),
            registered_model_name=registered_name,
            tags={"spec": scorer.spec.name, "arch": scorer.config["model"]["arch"], "tasks": ",".join(scorer.tasks)},
        )
    log.info("logged model %s for run %s", info.model_uri, run_id)
    return info.model_uri


def bundle_path(model_dir: Path) -> Path:
    """The bundle inside a downloaded pyfunc model directory (read from its MLmodel file)."""
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    artifacts = mlmodel["flavors"]["python_function"].get("artifacts", {})
    if "bundle" not in artifacts:
        raise ValueError(f"{model_dir}: not a recsys-moe model (its MLmodel has no 'bundle' artifact)")
    return model_dir / artifacts["bundle"]["path"]


def download_bundle(model_uri: str, target: Path, tracking_uri: str | None = None) -> Path:
    """Download a model (e.g. `models:/m-<id>`) into `target` once and return its bundle.

    `target` must be unique to that model: key it by the logged model's id, never by a registry
    name and version alone (two stores can both have a `ranker` v1) nor by an alias (it moves).
    """
    import mlflow

    if not (target / "MLmodel").exists():
        mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
        atomic.check_owned(target, "MLmodel")
        tmp = atomic.staging_dir(target)
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp))
            if not (tmp / "MLmodel").is_file():  # MLflow returns quietly when there is nothing to fetch
                raise FileNotFoundError(
                    f"{model_uri}: the store holds no files for this model (its artifacts were deleted or never "
                    "uploaded); promote or roll back to another version"
                )
            # Another process may be downloading the same model: the first whole copy stays, so
            # one that is reading it never sees it replaced (a gate failed on a vanished vocab).
            atomic.publish_once(tmp, target, "MLmodel")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    return bundle_path(target)

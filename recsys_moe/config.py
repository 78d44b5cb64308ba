"""Run configuration: model, training and tracking, validated at the edge.

One YAML file (or none: every field has a default) with `model:`, `train:` and `tracking:`
sections; any field can be overridden from the command line with `--set train.epochs=3`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator

M = TypeVar("M", bound=BaseModel)

# The multi-task architectures, by `model.arch` name: the one list the CLI, config validation,
# the model builder (`recsys_moe.model.ranker.ARCH_BUILDERS`) and the retraining DAG read.
ARCHITECTURES: dict[str, str] = {
    "single_task": "the network trained on one task (train.tasks=[NAME]), the papers' baseline",
    "shared_bottom": "one shared MLP, one tower per task (Caruana, 1997)",
    "omoe": "shared experts with one gate for all tasks (the MMoE paper's ablation)",
    "mmoe": "shared experts, one gate per task, one tower per task (Ma et al., KDD 2018)",
    "cgc": "task-specific experts + shared experts, one gate per task (Tang et al., RecSys 2020)",
    "ple": "model.ple_levels stacked CGC extraction layers with shared gates in between",
}


def _known_arch(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (one of: {', '.join(ARCHITECTURES)})")
    return arch


# An architecture's name, checked against the table (and listed in JSON schemas, e.g. the DAG's params).
ArchName = Annotated[str, AfterValidator(_known_arch), WithJsonSchema({"type": "string", "enum": list(ARCHITECTURES)})]


def default_run_dir(spec_name: str, arch: str) -> Path:
    """Where a run writes best/ and last/ unless train.checkpoint_dir says otherwise."""
    return Path("runs") / f"{spec_name}-{arch}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    arch: ArchName = "mmoe"
    num_experts: int = Field(8, ge=1, description="omoe/mmoe: experts shared by all tasks")
    num_task_experts: int = Field(2, ge=1, description="cgc/ple: experts owned by each task")
    num_shared_experts: int = Field(2, ge=1, description="cgc/ple: shared experts in every layer")
    ple_levels: int = Field(2, ge=1, description="ple: stacked extraction layers")
    gate: Literal["softmax", "topk", "noisy_topk"] = "softmax"
    gate_temperature: float = Field(1.0, gt=0)
    top_k: int = Field(2, ge=1, description="topk/noisy_topk: experts each sample is routed to")
    expert_compute: Literal["auto", "dense", "routed", "triton"] = Field(
        "auto",
        description="omoe/mmoe: how the experts run (same result, other speed). dense: every expert on every "
        "row; routed: experts only on their top-k rows; triton: the Triton kernels on CUDA (the torch path "
        "elsewhere); auto: routed for top-k gates, else dense",
    )
    expert_hidden: list[int] = Field(default_factory=lambda: [64, 32], min_length=1)
    tower_hidden: list[int] = Field(default_factory=lambda: [16])
    bottom_hidden: list[int] = Field(default_factory=lambda: [128, 64], min_length=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    input_norm: Literal["none", "layer"] = Field(
        "none",
        description="layer: a LayerNorm over each row of the model's input (embeddings + dense features) "
        "before the architecture; per row, so no score ever depends on the rest of the batch",
    )
    pack_tables_below: int = Field(
        100_000, ge=0, description="tables with fewer rows and equal dims share one TBE table"
    )

    @field_validator("expert_hidden", "tower_hidden", "bottom_hidden")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if any(h < 1 for h in sizes):
            raise ValueError("layer sizes must be positive")
        return sizes


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(1024, ge=1)
    eval_batch_size: int = Field(8192, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    embedding_optimizer: Literal["adagrad", "rowwise_adagrad", "sgd"] = Field(
        "adagrad", description="fused into FBGEMM's backward (its CPU kernels have no Adam)"
    )
    embedding_lr: float = Field(0.05, gt=0)
    embedding_l2: float = Field(
        0.0,
        ge=0,
        description="L2 penalty on the embeddings a batch looks up: this x the mean over rows of their squared "
        "norm, added to the loss (it reaches the tables through the fused optimizer, so every table and "
        "sharding gets it)",
    )
    first_layer_on_rows: bool = Field(
        True,
        description="single-process MMoE/OMoE on single-id features in one packed table: multiply each table "
        "row by its feature's slice of the first layer once per step and sum a sample's rows, instead of "
        "multiplying every sample's embeddings (the same model up to float rounding; a census step ran 1.36x "
        "as fast). Used when the largest feature has at most half a batch of rows, embedding_l2 is 0 and "
        "precision is fp32; false: always the plain lookup",
    )
    patience: int = Field(2, ge=1, description="epochs without improvement before stopping")
    min_epochs: int | None = Field(
        None,
        ge=1,
        description="no early stop before this many epochs; default: half of `epochs` (a cosine schedule's "
        "best epochs come late, once the rate has decayed)",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="dense learning rate after warmup: constant, or cosine decay to min_lr_ratio x lr"
    )
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of the planned steps spent warming up")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: the last step's rate as a share of lr")
    grad_clip_norm: float | None = Field(
        10.0, gt=0, description="clip the dense gradients' global norm to this (null: no clipping)"
    )
    baselines: bool = Field(
        True,
        description="also fit a smoothed per-id mean and a linear model on the same split, logged beside the model",
    )
    selection_metric: Literal["auc", "gauc"] = Field(
        "auc",
        description="binary tasks' score for picking the best epoch (mean over tasks): auc, or gauc "
        "(needs the spec's group_key)",
    )
    task_weighting: Literal["fixed", "uncertainty"] = Field(
        "fixed", description="fixed: the spec's task weights; uncertainty: learned (Kendall et al., 2018)"
    )
    balance_loss_weight: float = Field(0.0, ge=0, description="weight of the gates' load-balancing loss")
    collapse_threshold: float = Field(
        0.02, ge=0, lt=1, description="warn when an expert's mean gate weight (or routed share) falls below this"
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: while training, the dense expert block's first-layer GEMMs (MMoE, OMoE, CGC, PLE; "
        "most of their FLOPs) take bf16 operands; weights, accumulation and every other op stay fp32, and so "
        "do validation and scoring. Where the CPU multiplies bf16 in hardware (AVX512-BF16, AMX) a census "
        "training step ran 1.2x as fast; elsewhere it trains in fp32 with a warning",
    )
    seed: int = 0
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads; default $RECSYS_MOE_THREADS, else what the host can give now "
        "(affinity, CPU quota, less other processes' load; re-checked every 2 s)",
    )
    tasks: list[str] | None = Field(None, description="train only these tasks (single_task needs one)")
    max_steps_per_epoch: int | None = Field(None, ge=1)
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="sharded runs: steps between checkpoints of last/ (it is also written at every epoch end)",
    )
    checkpoint_dir: Path | None = Field(None, description="default: runs/<spec>-<arch> (default_run_dir)")
    sharding: dict[str, Literal["table_wise", "row_wise", "column_wise", "data_parallel"]] = Field(
        default_factory=dict,
        description="distributed runs (--nproc > 1): table or feature name → allowed sharding type; "
        "'*' applies to every table not named; unset tables are left to the planner",
    )
    memory_per_rank_gb: float | None = Field(
        None, gt=0, description="distributed runs: memory the sharding planner may use per rank (default: its own)"
    )


class TrackingConfig(_Strict):
    experiment: str | None = Field(None, description="default: recsys-moe/<spec name>")
    run_name: str | None = None
    enabled: bool = True


class RunConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def run_dir(self, spec_name: str) -> Path:
        """This run's directory: train.checkpoint_dir, else `default_run_dir`."""
        return self.train.checkpoint_dir or default_run_dir(spec_name, self.model.arch)

    def flat(self) -> dict[str, Any]:
        """'section.field' → value, for MLflow params."""
        out: dict[str, Any] = {}
        for section, values in self.model_dump(mode="json").items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


class ConfigError(ValueError):
    """A config file or setting that cannot be used; the message names the file and the field."""


MAX_YAML_BYTES = 1024 * 1024  # specs and configs are hand-written: a megabyte is a mistake
MAX_YAML_NODES = 100_000  # after anchors expand: a "billion laughs" file is small on disk


def _count_nodes(obj: Any, budget: int) -> int:
    """Nodes of a loaded YAML document, as a validator would walk them (shared anchors count at
    every use); stops counting past `budget`."""
    count, stack = 0, [obj]
    while stack and count <= budget:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return count


def load_yaml(path: str | Path, error: type[ValueError] = ValueError) -> Any:
    """A YAML file's content with bounded cost, or `error` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise error(f"{path}: {path.stat().st_size:,} bytes, over the limit of {MAX_YAML_BYTES:,} for a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise error(
            f"{path}: not valid YAML ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    if _count_nodes(raw, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise error(f"{path}: over {MAX_YAML_NODES:,} values once its anchors expand")
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or a ConfigError that says what is wrong with it."""
    if not Path(path).is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = load_yaml(path, ConfigError) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of field: value")
    return raw


def origin_of(path: str | Path | None, flags: dict[str, Any], command: str) -> str:
    """What an error should blame: the file, the flags, or both."""
    given = any(v is not None and v != [] for v in flags.values())
    if path is None:
        return f"{command} flags"
    return f"{path} with the flags given" if given else str(path)


def validated(model: type[M], raw: dict[str, Any], origin: str, what: str) -> M:
    """`raw` as `model`, or a ConfigError with one line per bad field (`section.field: problem`)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        details = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc']) or '<config>'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigError(f"{origin}: invalid {what}\n{details}") from None


def set_field(raw: dict[str, Any], assignment: str) -> None:
    """One `--set section.field=value` (the value read as YAML) into a raw config mapping."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.field=value, e.g. train.epochs=3")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or parts[0] not in RunConfig.model_fields:
        raise ConfigError(f"--set {assignment!r}: key must be one of model.*, train.*, tracking.*")
    raw.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(value)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The run config: the file's sections (or every default), then each `section.field=value`."""
    raw = read_yaml(path) if path is not None else {}
    for assignment in overrides or []:
        set_field(raw, assignment)
    return validated(RunConfig, raw, str(path) if path is not None else "<defaults>", "run config")

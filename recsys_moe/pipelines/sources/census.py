"""UCI Census-Income (KDD) as the MMoE paper splits it.

Train is the `.data` file; the `.test` file is split 1:1 at random (fixed seed) into validation
and test (Ma et al., KDD 2018, Sec. 6.3.1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

COLUMNS = [
    "age",
    "class_worker",
    "det_ind_code",
    "det_occ_code",
    "education",
    "wage_per_hour",
    "hs_college",
    "marital_stat",
    "major_ind_code",
    "major_occ_code",
    "race",
    "hisp_origin",
    "sex",
    "union_member",
    "unemp_reason",
    "full_or_part_emp",
    "capital_gains",
    "capital_losses",
    "stock_dividends",
    "tax_filer_stat",
    "region_prev_res",
    "state_prev_res",
    "det_hh_fam_stat",
    "det_hh_summ",
    "instance_weight",
    "mig_chg_msa",
    "mig_chg_reg",
    "mig_move_reg",
    "mig_same",
    "mig_prev_sunbelt",
    "num_emp",
    "fam_under_18",
    "country_father",
    "country_mother",
    "country_self",
    "citizenship",
    "own_or_self",
    "vet_question",
    "vet_benefits",
    "weeks_worked",
    "year",
    "income_50k",
]
DATA_FILE = "census-income.data.gz"
TEST_FILE = "census-income.test.gz"


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"census-income: {name} not found in {data_dir} (see ../shared/data/census-income)")


def read_raw(path: Path) -> pl.DataFrame:
    """Read one census file as strings; values lose their leading space and the label its '.'."""
    df = pl.read_csv(path, has_header=False, new_columns=COLUMNS, separator=",", infer_schema=False, quote_char=None)
    return df.with_columns(pl.all().str.strip_chars()).with_columns(pl.col("income_50k").str.strip_suffix("."))


def splits(data_dir: Path, seed: int = 0) -> dict[str, pl.LazyFrame]:
    data_dir = Path(data_dir)
    train = read_raw(_find(data_dir, DATA_FILE))
    test = read_raw(_find(data_dir, TEST_FILE))
    in_valid = np.zeros(test.height, dtype=bool)
    in_valid[np.random.default_rng(seed).permutation(test.height)[: test.height // 2]] = True
    mask = pl.Series("in_valid", in_valid)
    return {
        "train": train.lazy(),
        "valid": test.filter(mask).lazy(),
        "test": test.filter(~mask).lazy(),
    }

"""Id dropout: now and then a training row looks up the out-of-vocabulary row instead of its id.

Row 0 of every table is where unseen ids land at serving time (a new user, a new item), and
bucketed nulls. With `min_count: 1` no training id maps there, so without this the row keeps its
random initial vector and every cold user is scored with noise. Replacing a small share of
training ids with 0 teaches row 0 the average id: a cold user is scored as a typical one. The
rate is the spec's `vocab.oov_rate` (default 2% for fitted vocabularies, 0 for hashed ones).

The draw is seeded per (seed, epoch, step, rank), so a resumed run drops the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchrec import KeyedJaggedTensor

from recsys_moe.data.loader import Batch
from recsys_moe.features.spec import FeatureSpec


def oov_rates(spec: FeatureSpec, keys: Sequence[str]) -> torch.Tensor | None:
    """Per sparse key (the model's order), the share of its ids to drop; None when all are 0.

    Bucketized dense features have no vocabulary (their row 0 means null), so they keep theirs."""
    by_name = {f.name: f for f in spec.features}
    rates = [by_name[k].vocab_policy.training_oov_rate if by_name[k].kind != "dense" else 0.0 for k in keys]
    return torch.tensor(rates, dtype=torch.float32) if any(rates) else None


def step_generator(seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """A generator for one training step: the same ids drop whenever the step is replayed."""
    return torch.Generator().manual_seed(hash((seed, epoch, step, rank)) & 0x7FFF_FFFF_FFFF_FFFF)


def drop_to_oov(batch: Batch, rates: torch.Tensor, generator: torch.Generator) -> Batch:
    """`batch` with each sparse id replaced by 0 with its key's probability (a new KJT; the
    batch's own tensors, possibly views of the data set, are not written)."""
    kjt = batch.sparse
    values, lengths = kjt.values(), kjt.lengths()
    if values.numel() == 0:
        return batch
    per_key = lengths.view(len(kjt.keys()), -1).sum(dim=1)
    rate = torch.repeat_interleave(rates, per_key, output_size=values.numel())
    dropped = values.masked_fill(torch.rand(values.numel(), generator=generator) < rate, 0)
    sparse = KeyedJaggedTensor(keys=kjt.keys(), values=dropped, lengths=lengths)
    return Batch(dense=batch.dense, sparse=sparse, labels=batch.labels)

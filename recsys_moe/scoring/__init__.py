"""A trained model as a function of raw rows: the one scoring path shared by the promotion gate,
batch scoring, the MLflow pyfunc and the online endpoint (so they cannot drift apart)."""

from recsys_moe.scoring.ranking import RankingConfig, ranking_score
from recsys_moe.scoring.scorer import Scored, Scorer

__all__ = ["RankingConfig", "Scored", "Scorer", "ranking_score"]

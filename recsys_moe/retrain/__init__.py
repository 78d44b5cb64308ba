"""Scheduled retraining: the day's run as a typed object (`run`, light enough for a DAG file to
import at parse time) and the steps that the Airflow DAG `dags/retrain_ranking.py` wires together
(`steps`, each runnable and testable without Airflow)."""

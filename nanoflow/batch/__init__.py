"""Offline batch jobs: streaming admission (stream.py), shared-prefix grouping (grouping.py), the OpenAI
batch-file runner behind `nanoflow run-batch` (run_batch.py)."""

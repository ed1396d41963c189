"""hpml: measured, comparable efficient fine-tuning of BERT on SQuAD v2 and SST-2, tracked in MLflow."""

__version__ = "0.1.0"

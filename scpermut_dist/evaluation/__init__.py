"""Benchmarks of label transfer: metrics, baselines, leave-one-batch-out, ablation, plots."""

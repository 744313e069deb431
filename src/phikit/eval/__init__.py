"""Evaluation: benchmark tasks (multiple choice, code, GSM8K, perplexity, toxicity), the code sandbox, the
lm-evaluation-harness backend and reports. Submodules load on use so `import phikit.eval` stays light."""

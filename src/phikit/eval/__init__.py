"""Evaluation: benchmark tasks (multiple choice, code, GSM8K, perplexity, toxicity), the lm-evaluation-harness
backend and reports; model-written code runs in phikit.sandbox. Submodules load on use so `import phikit.eval`
stays light."""

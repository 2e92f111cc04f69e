"""Evaluation: sliding-window perplexity (`perplexity`), LAMBADA (`lambada`) and lm-eval harness
tasks (`tasks`) on a loaded model and tokenizer (`models`), over built-in or given text (`data`);
`runner` is `mesh-convert eval`'s, `options` its options."""

"""Where activations come from: language models by name (two embedded offline), text corpora
cut into token windows, and activation collection and caching."""

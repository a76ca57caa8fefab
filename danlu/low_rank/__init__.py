"""Low-rank factorization: a linear layer's weight W replaced by two thin factors B @ A from its truncated SVD
(`svd`), held by `LowRankLinear` (`linear`), put into a model in place by `factorize` (`transform`) and written
and read as a Hugging Face directory with a `low_rank` field in config.json (`checkpoint`)."""

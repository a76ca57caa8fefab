"""Pruning: unstructured magnitude pruning (`magnitude`) and structured pruning of attention key/value groups
and FFN neurons into a smaller dense model (`structured`), scored on calibration text (`calibration`)."""

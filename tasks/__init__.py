"""Text work over a Model and an Encoder: sampling and generation, sentence
vectors, sentence scores, fine-tuning and its datasets.  Each task is a
library call that the command-line tools, the server and the bulk runner
share, so their numbers agree by construction."""

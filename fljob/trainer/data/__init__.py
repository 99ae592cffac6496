"""Training data: the bundled text corpus, tokenizers, token files and their loaders.

Entry points: :func:`.prepare.prepare_bundled_text` (before the trainer is built) and
:func:`.builder.build_tokenizer` / :func:`.builder.build_dataloader` (used by the TrainSpec).
"""

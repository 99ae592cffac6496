"""Hugging Face out and in: ``fljob export hf`` and ``fljob import hf``.

- :mod:`.folding`: names and folded muP multipliers (no torch needed to read it);
- :mod:`.modeling_fljob_llama`: the remote-code model an export ships when a stock Llama
  cannot compute the function (a real module, copied into the export as it is);
- :mod:`.source`: where a checkpoint is (run folder, URI, step) and its model weights only;
- :mod:`.reference`: the token sequence, logits and loss that prove an export equal;
- :mod:`.export` and :mod:`.importer`: the two commands;
- :mod:`.init_from`: ``checkpoint.init_from``, the trainer's start from such weights.

Importing this package imports nothing heavy; transformers is imported by the commands.
"""

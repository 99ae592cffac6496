"""muP Llama3 for torchtitan 0.2.2: args, model, flavors, muP param groups, parallelize,
Hugging Face state-dict adapter (one concept per module; MUP.md states the muP choices).

Deliberately empty of imports: ``args`` and ``flavors`` are torch-free so the job spec can
use them, and importing this package must not pull in torch.
"""

"""AdamW, the baseline: ``torch.optim.AdamW`` itself, not a re-implementation.

torch's class already has the single-tensor, foreach and fused paths, keeps the state keys
of fljob's protocol (``exp_avg``, ``exp_avg_sq``, tensor ``step``; see :mod:`.base`) and is
the reference everything else is benchmarked against, so wrapping it would only add a place
for differences to hide. Its weight decay is Loshchilov & Hutter's as torch implements it,
``p *= 1 - lr * wd`` -- scaled by the group's lr, unlike fljob's decoupled mode
(:mod:`.weight_decay`), so a typical ``weight_decay`` here is 0.01 to 0.1.
"""

from torch.optim import AdamW

__all__ = ["AdamW"]

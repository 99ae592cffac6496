"""DecoupledAdamW: Adam with weight decay decoupled from the learning rate (Composer style)."""

from __future__ import annotations

from torch.optim.optimizer import ParamsT

from fljob.trainer.optim.qhadamw import QHAdamW


class DecoupledAdamW(QHAdamW):
    r"""Adam whose weight decay follows the LR *schedule* but not the LR's size.

    At step :math:`t` (1-based), with :math:`f = \mathrm{lr}/\mathrm{initial\_lr}`:

    .. math::
        p &\leftarrow p\,(1 - f\,\mathrm{wd}) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t, \qquad
        v_t  = \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2 \\
        p &\leftarrow p - \frac{\mathrm{lr}}{1-\beta_1^t}\,
              \frac{m_t}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}

    torch's AdamW decays by ``lr * wd`` instead, so there the effective decay changes when
    the base lr (or a muP group's lr) changes; here ``wd`` is the per-step fraction at peak
    LR. Defaults follow Composer (``betas=(0.9, 0.95)``, ``weight_decay=1e-5``).

    Implemented as :class:`QHAdamW` with :math:`\nu = (1, 1)` and ``decouple=True``, which
    is Adam exactly; unlike the original research code it has a real foreach path and no
    per-parameter host synchronisation.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 1e-5,
        *,
        foreach: bool | None = None,
        fused: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            nus=(1.0, 1.0),
            eps=eps,
            weight_decay=weight_decay,
            decouple=True,
            foreach=foreach,
            fused=fused,
        )

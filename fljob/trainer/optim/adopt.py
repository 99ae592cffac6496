"""ADOPT (Taniguchi et al., 2024), including its clipping schedule."""

from __future__ import annotations

from torch.optim.optimizer import ParamsT

from fljob.trainer.optim.qhadopt import QHADOPT


class ADOPT(QHADOPT):
    r"""ADOPT ("ADOPT: Modified Adam Can Converge with Any :math:`\beta_2` with the Optimal Rate").

    The first gradient only seeds :math:`v_0 = g_0^2` and leaves the parameters alone
    (no update, no decoupled decay). For :math:`t \ge 1`:

    .. math::
        \hat g_t &= \mathrm{clip}\!\left(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)},\; c_t\right),
            \qquad c_t = t^{\,\mathrm{clip\_exponent}} \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, \hat g_t, \qquad m_0 = 0 \\
        p_t &= p_{t-1} - \mathrm{lr}\; m_t \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2

    Normalising by the *previous* :math:`v` decorrelates a gradient from its normaliser,
    which is why ADOPT converges for any :math:`\beta_2`; there is no bias correction.
    ``clip_exponent=0.25`` is the :math:`t^{1/4}` schedule of the authors' implementation;
    ``None`` disables clipping. Defaults are the paper's (``betas=(0.9, 0.9999)``,
    ``eps=1e-6``, coupled weight decay). The ``step`` counter includes the seeding
    gradient, so :math:`t` = ``step - 1``.

    Implemented as :class:`QHADOPT` with :math:`\nu_1 = 1`, which is ADOPT exactly; the
    QH branch is skipped, so it costs nothing.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        decouple: bool = False,
        clip_exponent: float | None = 0.25,
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
            decouple=decouple,
            clip_exponent=clip_exponent,
            foreach=foreach,
            fused=fused,
        )

"""Linear-system solvers for merging: batched conjugate gradient and the merging objectives' matvecs.

Merging as matching models in their task parameter subspaces (MaTS, Tam et al. 2024) is the linear system
A x = b with A = Σ_m C_m and b = Σ_m C_m θ_m; `objectives` builds A's matvec (never A itself) for each choice of
C_m, `cg` solves a batch of such systems of equal shape at once, in torch on the tensors' device.
"""
from pymerge.solvers.cg import CGResult, conjugate_gradient  # noqa: F401
from pymerge.solvers.objectives import (  # noqa: F401
    AverageObjective, DiagonalFisherObjective, GramObjective, KFACObjective, Objective, scale_off_diagonal,
)
from pymerge.solvers.closed_form import regmean_solve  # noqa: F401

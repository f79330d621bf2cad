"""Cardinality-constrained (sparse) ridge regression on the gradient matrix G, shared by `lr`
(CHITA / the LR arm of SWAP) and `swap` (entropic Wasserstein regression).

Problem (algorithms.md sections 1.1, 5.1, 6.1). With y = G w_bar (targets), yhat(w) = G w and a
transport plan Pi (N x N, held fixed while solving):

    Q(w) = (N/2) sum_ij Pi_ij (y_i - yhat_j(w))^2 + (N lam / 2) ||w - w_bar||^2,   ||w||_0 <= k.

Pi = I/N gives the LR / CHITA objective  Q_LR(w) = 1/2 ||y - G w||^2 + (N lam / 2)||w - w_bar||^2.
With column marginals b = Pi^T 1, row marginals a = Pi 1 and the barycentric targets
z_j = (Pi^T y)_j / b_j, the data term rewrites (exactly, for any plan) as

    (N/2) sum_ij Pi_ij (y_i - yhat_j)^2 = 1/2 sum_j omega_j (yhat_j - z_j)^2 + C,
    omega = N b,   C = (N/2) (sum_i a_i y_i^2 - sum_j b_j z_j^2) >= 0,

so every plan yields a weighted least-squares problem in w; this is how `PlanRegression`
evaluates Q (no N x N cost matrix, no cancellation). Its exact gradient is
G^T (omega * (yhat - z)) + N lam (w - w_bar). The search direction is pluggable:

* ``gradient``: the exact gradient above;
* ``paper``: d = G^T (N Pi)(G w - y) + N lam (w - w_bar), the direction of the SWAP code as run
  for the paper (algorithms.md 6.1). Not a gradient of Q unless Pi is symmetric with uniform
  marginals; the step is still chosen by exact minimisation of Q along it.

With Pi = I/N (`IdentityPlan`) both directions are G^T (G w - y) + N lam (w - w_bar), the
objective is Q_LR, and `lr` and `swap` run the very same iterations.

Solvers (CHITA, Benbaki et al. ICML 2023, `CHITA_opt/L0_card_const.py`; algorithms.md 5.1):

* `iht_ls`: IHT with exact line search (CHITA `hard_thresholding_ls`). From a k-sparse w with
  support S: tau* minimises the quadratic Q(w - tau d_S) (closed form); L_change is the largest
  step that keeps the top-k support of w - tau d; if tau* < L_change take it, else start at
  L_change / (1 + 1e-4) and grow the step (x `step_growth`, at most `step_search` times) while
  Q(H_k(w - tau d)) decreases. The first iterate is the better of H_k(w0) and one plain IHT step
  w0 - d / L with L = 1.05 (sigma_max(sqrt(omega) G)^2 + N lam) (power iteration; L is doubled
  until the step does not increase Q when w0 is already k-sparse).
* `active_set_iht`: CHITA `Active_IHTCDLS` (cd_itr = 0): the active set starts as the support of
  one IHT step with int(1.5 k) non-zeros; IHT-LS runs on the columns of the active set; then an
  outlier search takes full IHT steps with L = 2 L_A, L_A / 2, ... (at most `outlier_search`
  halvings) and, when one lowers Q with support outside the set, the set grows and it repeats.
* `backsolve`: CHITA `Heuristic_LS`: support = top-k |w_bar| (or one IHT step), then the exact
  minimiser on the support, (G_S^T Omega G_S + N lam I) w_S = G_S^T Omega z + N lam w_bar_S, solved
  in the N x N space by Woodbury when N < k (Cholesky of sqrt(Omega) G_S G_S^T sqrt(Omega) + N lam I);
  factorised in G's dtype with float64 iterative refinement (a float64 factorisation when that fails;
  info `backsolve_factor`, `backsolve_refinements`, `backsolve_residual`); G_S is gathered once when
  a dense copy fits the operator's `max_resident_bytes`, else streamed by column chunks.

Options (defaults = the original behaviour, which `swap` keeps; `lr` turns all three on):
`drop_zero_columns` solves without the all-zero columns of G (CHITA `*_PP`; those weights stay
zero, Q keeps their ridge term); `support_steps: cg` takes conjugate directions while the support
is fixed (linear CG on the quadratic Q restricted to it; a support change restarts them, and the
outlier search then skips trial steps that stay inside the active set instead of stopping on
them); `finish: backsolve` replaces the final iterate by the exact minimiser on its support.

Every objective value the solvers record is Q of the full p-vector; the recorded sequence never
increases (steps that would increase it are rejected, and IHT-LS stops: info `stop` is ftol,
max_iter, no_decrease, or no_descent when <grad Q, d_S> <= 0, which the paper direction can give
for near-uniform plans; the SWAP code's step search then returns tau = 0 as well; `active_iht` also
records `stops`, each round's stop, and `rounds_capped`). No p x p matrix is ever formed; G is only
used through matvec / rmatvec and, for the active set and backsolve, through column subsets: the
`GradientOperator` protocol (`pruning.gradients.operator`), whatever stores G.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from pruning.errors import ConfigError, choice
from pruning.gradients.operator import COLUMN_CHUNK, ColumnView, DenseOperator, GradientOperator  # noqa: F401 (solvers' vocabulary)
from pruning.layout import topk_mask

ALGORITHMS = ("active_iht", "iht", "backsolve")
DIRECTIONS = ("paper", "gradient")
PRECISIONS = ("auto", "float32", "float64")
BACKSOLVE_SUPPORTS = ("magnitude", "iht")
SUPPORT_STEPS = ("gradient", "cg")
FINISHES = ("none", "backsolve")


# ------------------------------------------------------------------------------------ operators
def cast_operator(op: GradientOperator, dtype: torch.dtype) -> GradientOperator:
    """`op` in `dtype` (a copy when it differs; unchanged otherwise)."""
    return op if op.dtype == dtype else op.to(op.device, dtype)


def power_sigma_sq(op: GradientOperator, weights: torch.Tensor | None = None, iters: int = 30,
                   seed: int = 0) -> float:
    """sigma_max(sqrt(W) G)^2 by power iteration on G^T W G (a lower bound that converges)."""
    n = op.num_cols
    if n == 0:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float64).to(op.dtype).to(op.device)
    v = v / v.norm()
    est = 0.0
    for _ in range(max(iters, 1)):
        Gv = op.matvec(v)
        if weights is not None:
            Gv = Gv * weights.to(Gv.dtype)
        u = op.rmatvec(Gv)
        nu = float(u.norm())
        if nu == 0.0:
            return 0.0
        est = nu
        v = u / nu
    return est


# ----------------------------------------------------------------------------------------- plans
class Plan:
    """A transport plan Pi (N x N) between the targets y (rows) and predictions yhat (columns)."""

    kind: str = "plan"
    n: int

    def apply(self, r: torch.Tensor) -> torch.Tensor:
        """Pi r."""
        raise NotImplementedError

    def apply_t(self, r: torch.Tensor) -> torch.Tensor:
        """Pi^T r."""
        raise NotImplementedError

    def row_marginal(self) -> torch.Tensor:
        return self.apply(torch.ones(self.n, dtype=torch.float64))

    def col_marginal(self) -> torch.Tensor:
        return self.apply_t(torch.ones(self.n, dtype=torch.float64))

    def dense(self) -> torch.Tensor:
        return self.apply(torch.eye(self.n, dtype=torch.float64))

    def entropy(self) -> float:
        """-sum Pi log Pi (0 log 0 = 0)."""
        P = self.dense()
        P = P[P > 0]
        return float(-(P * P.log()).sum())

    def scaled_apply(self, r: torch.Tensor) -> torch.Tensor:
        """(N Pi) r, the residual mixing of the paper-era direction."""
        return self.n * self.apply(r)

    def weighted_targets(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(omega, z, C) with (N/2) sum Pi_ij (y_i - yhat_j)^2 = 1/2 sum omega (yhat - z)^2 + C."""
        y = y.to(torch.float64)
        a, b = self.row_marginal().to(y.device), self.col_marginal().to(y.device)
        Pty = self.apply_t(y)
        pos = b > 0
        z = torch.where(pos, Pty / torch.where(pos, b, torch.ones_like(b)), y)
        omega = self.n * b
        const = 0.5 * self.n * float((a * y * y).sum() - (b * z * z).sum())
        return omega, z, max(const, 0.0)


class IdentityPlan(Plan):
    """Pi = I/N: no transport, the LR objective."""

    kind = "identity"

    def __init__(self, n: int):
        self.n = n

    def apply(self, r: torch.Tensor) -> torch.Tensor:
        return r / self.n

    def apply_t(self, r: torch.Tensor) -> torch.Tensor:
        return r / self.n

    def entropy(self) -> float:
        return math.log(self.n)

    def scaled_apply(self, r: torch.Tensor) -> torch.Tensor:
        return r

    def weighted_targets(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        y = y.to(torch.float64)
        return torch.ones_like(y), y.clone(), 0.0


class PermutationPlan(Plan):
    """Pi_{i, perm[i]} = 1/N (the exact 1-D OT plan for epsilon = 0)."""

    kind = "permutation"

    def __init__(self, perm: torch.Tensor):
        self.perm = perm.to(torch.long)
        self.n = int(perm.numel())

    def apply(self, r: torch.Tensor) -> torch.Tensor:
        return r[self.perm.to(r.device)] / self.n

    def apply_t(self, r: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(r)
        out[self.perm.to(r.device)] = r
        return out / self.n

    def entropy(self) -> float:
        return math.log(self.n)

    def scaled_apply(self, r: torch.Tensor) -> torch.Tensor:
        return r[self.perm.to(r.device)]

    def dense(self) -> torch.Tensor:
        P = torch.zeros(self.n, self.n, dtype=torch.float64)
        P[torch.arange(self.n), self.perm.cpu()] = 1.0 / self.n
        return P

    def weighted_targets(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        y = y.to(torch.float64)
        z = torch.empty_like(y)
        z[self.perm.to(y.device)] = y
        return torch.ones_like(y), z, 0.0


class UniformPlan(Plan):
    """Pi = 1/N^2 (epsilon = infinity): only the mean and spread of y and yhat are matched."""

    kind = "uniform"

    def __init__(self, n: int):
        self.n = n

    def apply(self, r: torch.Tensor) -> torch.Tensor:
        return (r.sum(0, keepdim=True) / self.n ** 2).expand_as(r).clone()

    def apply_t(self, r: torch.Tensor) -> torch.Tensor:
        return self.apply(r)

    def dense(self) -> torch.Tensor:
        return torch.full((self.n, self.n), 1.0 / self.n ** 2, dtype=torch.float64)

    def entropy(self) -> float:
        return 2.0 * math.log(self.n)

    def scaled_apply(self, r: torch.Tensor) -> torch.Tensor:
        return torch.full_like(r, float(r.mean()))

    def weighted_targets(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        y = y.to(torch.float64)
        mean = float(y.mean())
        return torch.ones_like(y), torch.full_like(y, mean), 0.5 * self.n * float((y * y).mean() - mean * mean)


class DensePlan(Plan):
    """An explicit N x N plan (Sinkhorn)."""

    kind = "dense"

    def __init__(self, P: torch.Tensor):
        self.P = P.to(torch.float64)
        self.n = int(P.shape[0])

    def _on(self, device: torch.device) -> torch.Tensor:
        if self.P.device != device:
            self.P = self.P.to(device)  # moved once, with the vectors it acts on
        return self.P

    def apply(self, r: torch.Tensor) -> torch.Tensor:
        return (self._on(r.device) @ r.to(torch.float64)).to(r.dtype)

    def apply_t(self, r: torch.Tensor) -> torch.Tensor:
        return (self._on(r.device).T @ r.to(torch.float64)).to(r.dtype)

    def row_marginal(self) -> torch.Tensor:
        return self.P.sum(1)

    def col_marginal(self) -> torch.Tensor:
        return self.P.sum(0)

    def dense(self) -> torch.Tensor:
        return self.P.clone()


# ------------------------------------------------------------------------------------ objective
def _dot64(a: torch.Tensor, b: torch.Tensor, a_shift: torch.Tensor | None = None,
           b_shift: torch.Tensor | None = None, chunk: int = 1 << 20) -> float:
    """(a - a_shift) . (b - b_shift) in float64, `chunk` entries at a time, so that no float64 copy
    of a p-vector is made (each would be 204 MB on ResNet-50)."""
    total = 0.0
    for s in range(0, a.numel(), chunk):
        x = a[s:s + chunk].to(torch.float64)
        if a_shift is not None:
            x = x - a_shift[s:s + chunk].to(torch.float64)
        y = b[s:s + chunk].to(torch.float64)
        if b_shift is not None:
            y = y - b_shift[s:s + chunk].to(torch.float64)
        total += float(x @ y)
    return total


class PlanRegression:
    """Q(w) for a fixed plan, evaluated from yhat = G w (see the module docstring).

    `offset` is the constant (N lam / 2)||w_bar||^2 over the columns left out when the problem is
    restricted to an active set, so restricted values equal Q of the embedded full vector.
    """

    def __init__(self, y: torch.Tensor, w_bar: torch.Tensor, lam: float, plan: Plan,
                 direction: str = "paper", offset: float = 0.0):
        choice(direction, "method.direction", DIRECTIONS)
        self.y, self.w_bar, self.lam, self.plan, self.direction = y, w_bar, float(lam), plan, direction
        self.n = int(y.numel())
        self.nlam = self.n * self.lam
        omega, z, const = plan.weighted_targets(y)
        self.omega, self.z, self.const = omega.to(y.device), z.to(y.device), const
        self.offset = float(offset)
        self._unit = isinstance(plan, IdentityPlan | PermutationPlan | UniformPlan)

    def restrict(self, idx: torch.Tensor) -> PlanRegression:
        keep = torch.zeros(self.w_bar.numel(), dtype=torch.bool, device=self.w_bar.device)
        keep[idx] = True
        rest = self.w_bar[~keep].to(torch.float64)
        sub = PlanRegression.__new__(PlanRegression)
        sub.__dict__.update(self.__dict__)
        sub.w_bar = self.w_bar[idx]
        sub.offset = self.offset + 0.5 * self.nlam * float(rest @ rest)
        return sub

    # --- values
    def value(self, w: torch.Tensor, yhat: torch.Tensor) -> float:
        e = yhat.to(torch.float64) - self.z
        data = 0.5 * float(e @ e) if self._unit else 0.5 * float((self.omega * e) @ e)
        return data + self.const + 0.5 * self.nlam * _dot64(w, w, self.w_bar, self.w_bar) + self.offset

    def grad_residual(self, yhat: torch.Tensor) -> torch.Tensor:
        """omega * (yhat - z): G^T of it plus the ridge term is the exact gradient."""
        e = yhat.to(torch.float64) - self.z
        return (e if self._unit else self.omega * e).to(yhat.dtype)

    def direction_residual(self, yhat: torch.Tensor) -> torch.Tensor:
        if self.direction == "gradient":
            return self.grad_residual(yhat)
        r = yhat.to(torch.float64) - self.y.to(torch.float64)
        return self.plan.scaled_apply(r).to(yhat.dtype)

    def direction_vec(self, op: GradientOperator, w: torch.Tensor, yhat: torch.Tensor) -> torch.Tensor:
        d = op.rmatvec(self.direction_residual(yhat)).to(w.dtype)
        return d + self.nlam * (w - self.w_bar.to(w.dtype))

    def grad_dot(self, v: torch.Tensor, Gv: torch.Tensor, w: torch.Tensor, yhat: torch.Tensor) -> float:
        """<grad Q(w), v>, using Gv = G v (no extra product with G)."""
        gr = self.grad_residual(yhat).to(torch.float64)
        return float(gr @ Gv.to(torch.float64)) + self.nlam * _dot64(w, v, self.w_bar)

    def curvature(self, v: torch.Tensor, Gv: torch.Tensor) -> float:
        """v^T H v with H = G^T Omega G + N lam I."""
        g = Gv.to(torch.float64)
        data = float(g @ g) if self._unit else float((self.omega * g) @ g)
        return data + self.nlam * _dot64(v, v)

    def lipschitz(self, op: GradientOperator, iters: int) -> float:
        weights = None if self._unit else self.omega
        return 1.05 * (power_sigma_sq(op, weights, iters) + self.nlam)


# ---------------------------------------------------------------------------------- solver config
@dataclass(frozen=True)
class SolverConfig:
    """Knobs of the IHT solvers (CHITA's names in brackets). Shared by `lr` and `swap`."""

    lam: float = 0.01                # ridge lambda: (N lam / 2)||w - w_bar||^2 (CHITA l2, SWAP lambda)
    algorithm: str = "active_iht"    # active_iht | iht | backsolve
    max_iter: int = 100              # IHT-LS iterations per solve [iht_max_itr]
    ftol: float = 1e-7               # relative objective change that ends IHT-LS [ftol]
    active_set_factor: float = 1.5   # initial active set: int(factor k) non-zeros [kimp]
    active_set_rounds: int = 10      # outer active-set iterations [act_max_itr]
    step_search: int = 5             # step expansions past the support-change bound [sea1_max_itr]
    step_growth: float = 2.0         # expansion factor (CHITA 2; the SWAP code uses 1.05)
    outlier_search: int = 10         # L halvings in the outlier search [sea2_max_itr]
    backsolve_support: str = "magnitude"  # magnitude (top-k |w_bar|) | iht (support of one IHT step)
    power_iters: int = 30            # power iterations for sigma_max(G)^2
    precision: str = "auto"          # auto (G's dtype) | float32 | float64
    # The three below default to the shared solver's original behaviour (swap's); lr turns them on.
    drop_zero_columns: bool = False  # solve without all-zero columns of G, left at zero [CHITA *_PP wrappers]
    support_steps: str = "gradient"  # gradient (CHITA) | cg: conjugate directions while the support is fixed
    finish: str = "none"             # none | backsolve: exact ridge minimiser on the final support

    def validate(self) -> None:
        choice(self.algorithm, "method.algorithm", ALGORITHMS)
        choice(self.support_steps, "method.support_steps", SUPPORT_STEPS)
        choice(self.finish, "method.finish", FINISHES)
        if not isinstance(self.drop_zero_columns, bool):
            raise ConfigError("method.drop_zero_columns", self.drop_zero_columns, "true, false")
        choice(self.precision, "method.precision", PRECISIONS)
        choice(self.backsolve_support, "method.backsolve_support", BACKSOLVE_SUPPORTS)
        if not (isinstance(self.lam, int | float) and self.lam >= 0 and math.isfinite(self.lam)):
            raise ConfigError("method.lam", self.lam, "a finite number >= 0")
        for key in ("max_iter", "active_set_rounds", "step_search", "outlier_search", "power_iters"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"method.{key}", v, "an integer >= 0")
        if not self.ftol >= 0:
            raise ConfigError("method.ftol", self.ftol, "a number >= 0")
        if not self.active_set_factor >= 1:
            raise ConfigError("method.active_set_factor", self.active_set_factor, "a number >= 1")
        if not self.step_growth > 1:
            raise ConfigError("method.step_growth", self.step_growth, "a number > 1")

    def compute_dtype(self, op: GradientOperator) -> torch.dtype:
        if self.precision == "auto":
            return op.dtype
        return torch.float64 if self.precision == "float64" else torch.float32


@dataclass
class SolveResult:
    w: torch.Tensor                  # (p,) solution, zero off the mask
    mask: torch.Tensor               # (p,) bool, exactly k entries
    objective: float                 # Q(w)
    history: list[float] = field(default_factory=list)  # Q after the first k-sparse iterate and each step
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ IHT pieces
def _hard_threshold(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = topk_mask(x.abs(), k)
    return x * mask, mask


def _support_change_bound(w: torch.Tensor, d: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest tau for which the top-k support of |w - tau d| is still `mask` (w zero off it)."""
    off = ~mask
    if not bool(off.any()):
        return math.inf
    m = float(d[off].abs().max())
    wS, dS = w[mask].to(torch.float64), d[mask].to(torch.float64)
    same = torch.sign(wS) == torch.sign(dS)
    # same sign: |w| - tau|d| >= tau m; opposite sign: |w| + tau|d| >= tau m (binding only if |d| < m)
    denom = torch.where(same, dS.abs() + m, m - dS.abs())
    binding = same | (dS.abs() < m)
    if not bool(binding.any()):
        return math.inf
    ratio = wS.abs()[binding] / denom[binding]
    ratio = torch.where(denom[binding] > 0, ratio, torch.full_like(ratio, math.inf))
    return float(ratio.min())


def _plain_step(obj: PlanRegression, op: GradientOperator, w: torch.Tensor, yhat: torch.Tensor, k: int, L: float,
                d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One IHT step w -> H_k(w - d / L) with its yhat and Q."""
    if d is None:
        d = obj.direction_vec(op, w, yhat)
    x, mask = _hard_threshold(w - d / L, k)
    yh = op.matvec(x).to(w.dtype)
    return x, mask, yh, obj.value(x, yh)


@dataclass
class _State:
    w: torch.Tensor
    mask: torch.Tensor
    yhat: torch.Tensor
    f: float


def _first_iterate(obj: PlanRegression, op: GradientOperator, w0: torch.Tensor, k: int, L: float,
                   yhat0: torch.Tensor | None = None) -> tuple[_State, dict[str, Any]]:
    """The better of H_k(w0) and one IHT step from w0 (L doubled up to 20 times while the step
    increases Q, when w0 is already k-sparse and so feasible)."""
    yhat0 = op.matvec(w0).to(w0.dtype) if yhat0 is None else yhat0
    x0, m0 = _hard_threshold(w0, k)
    feasible = int((w0 != 0).sum()) <= k
    y0 = yhat0 if feasible else op.matvec(x0).to(w0.dtype)
    best = _State(x0, m0, y0, obj.value(x0, y0))
    d = obj.direction_vec(op, w0, yhat0)
    for _ in range(20):
        x, mask, yh, f = _plain_step(obj, op, w0, yhat0, k, L, d)
        if f <= best.f:
            return _State(x, mask, yh, f), {"L": L}
        L *= 2.0
    return best, {"L": L}


@dataclass
class _Conjugate:
    """The previous support-preserving step of `support_steps: cg`: its direction p, G p and the
    gradient on the support v (Polak-Ribiere needs v_prev); None after a support change."""

    p: torch.Tensor
    Gp: torch.Tensor
    v: torch.Tensor


def _ls_step(obj: PlanRegression, op: GradientOperator, s: _State, k: int, cfg: SolverConfig,
             prev: _Conjugate | None = None) -> tuple[_State, str, _Conjugate | None]:
    """One IHT step with exact line search from a k-sparse state (CHITA hard_thresholding_ls).

    With `prev` (cg, the last step kept the support too) a step that keeps the support goes along
    the conjugate direction p = v + beta p_prev (Polak-Ribiere+, beta = max(0, v.(v - v_prev) /
    |v_prev|^2)) instead of v = d_S: on a fixed support Q is a quadratic, so these are linear
    conjugate-gradient steps, exact along p, and G p = G v + beta G p_prev needs no extra product."""
    d = obj.direction_vec(op, s.w, s.yhat)
    v = d * s.mask
    Gv = op.matvec(v).to(s.w.dtype)
    num, den = obj.grad_dot(v, Gv, s.w, s.yhat), obj.curvature(v, Gv)
    tau_opt = num / den if den > 0 else 0.0
    bound = _support_change_bound(s.w, d, s.mask)
    if tau_opt > 0 and tau_opt < bound:
        steps = [(v, Gv, tau_opt)]
        if prev is not None:
            vv = _dot64(prev.v, prev.v)
            beta = max(0.0, (_dot64(v, v) - _dot64(v, prev.v)) / vv) if vv > 0 else 0.0
            if beta > 0:
                p_c, Gp_c = v + beta * prev.p, Gv + beta * prev.Gp
                num_c, den_c = obj.grad_dot(p_c, Gp_c, s.w, s.yhat), obj.curvature(p_c, Gp_c)
                if num_c > 0 and den_c > 0:  # a descent direction; v stays the fallback (rounding)
                    steps.insert(0, (p_c, Gp_c, num_c / den_c))
        for p, Gp, tau in steps:
            w = s.w - tau * p
            yhat = s.yhat - tau * Gp
            f = obj.value(w, yhat)
            if f < s.f:
                return _State(w, s.mask, yhat, f), "exact", _Conjugate(p, Gp, v)
        return s, "no_decrease", None
    tau = bound / (1.0 + 1e-4) if 0 < bound < math.inf else tau_opt
    if not tau > 0:
        return s, ("no_descent" if num <= 0 else "no_decrease"), None
    best, kind = s, ("no_descent" if num <= 0 else "no_decrease")
    for _ in range(max(cfg.step_search, 1)):
        x, mask = _hard_threshold(s.w - tau * d, k)
        yh = op.matvec(x).to(s.w.dtype)
        f = obj.value(x, yh)
        if f < best.f:
            best, kind = _State(x, mask, yh, f), "expanded"
        else:
            break
        tau *= cfg.step_growth
    return best, kind, None


def iht_ls(obj: PlanRegression, op: GradientOperator, w0: torch.Tensor, k: int, cfg: SolverConfig,
           L: float | None = None) -> SolveResult:
    """IHT with exact line search (CHITA Vanilla_IHTCDLS, cd_itr = 0) on the operator `op`; stops
    when the relative change of Q is at most ftol (`stop` ftol), after max_iter steps (max_iter),
    or when a step cannot lower Q (no_decrease / no_descent)."""
    if L is None:
        L = obj.lipschitz(op, cfg.power_iters)
    s, first = _first_iterate(obj, op, w0, k, L)
    history = [s.f]
    kinds = {"exact": 0, "expanded": 0}
    it, stop = 0, "max_iter"
    conj: _Conjugate | None = None
    while it < cfg.max_iter:
        new, kind, step = _ls_step(obj, op, s, k, cfg, conj)
        if kind not in kinds:
            stop = kind
            break
        conj = step if cfg.support_steps == "cg" else None
        it += 1
        kinds[kind] += 1
        history.append(new.f)
        done = abs(s.f - new.f) <= cfg.ftol * max(abs(s.f), abs(new.f))
        s = new
        if done:
            stop = "ftol"
            break
    info = {"iterations": it, "steps_exact": kinds["exact"], "steps_expanded": kinds["expanded"], "L": first["L"],
            "stop": stop}
    return SolveResult(s.w, s.mask, s.f, history, info)


def active_set_iht(obj: PlanRegression, op: GradientOperator, w0: torch.Tensor, k: int, cfg: SolverConfig) -> SolveResult:
    """CHITA Active_IHTCDLS (cd_itr = 0): IHT-LS on a growing active set of columns."""
    p = op.num_cols
    k_act = max(min(int(cfg.active_set_factor * k), p), k)  # CHITA initial_active_set: int()
    if k_act >= p:
        res = iht_ls(obj, op, w0, k, cfg)
        res.info.update(active_set_rounds=0, active_set_size=p)
        return res
    L = obj.lipschitz(op, cfg.power_iters)
    yhat0 = op.matvec(w0).to(w0.dtype)
    _, active, _, _ = _plain_step(obj, op, w0, yhat0, k_act, L)
    w = w0.clone()
    history: list[float] = []
    iterations, rounds, outliers_total, stop, capped = 0, 0, 0, "max_iter", False
    stops: list[str] = []  # each round's IHT-LS stop, for the record (`stops`)
    s: _State | None = None
    while True:
        idx = active.nonzero().squeeze(1)
        opA = op.restrict(idx)
        objA = obj.restrict(idx)
        res = iht_ls(objA, opA, w[idx], k, cfg)
        iterations += res.info["iterations"]
        stop = res.info["stop"]
        stops.append(stop)
        capped = capped or stop == "max_iter"
        w = torch.zeros_like(w0)
        w[idx] = res.w
        mask = torch.zeros(p, dtype=torch.bool, device=w0.device)
        mask[idx] = res.mask
        yhat = opA.matvec(res.w).to(w0.dtype)
        s = _State(w, mask, yhat, obj.value(w, yhat))
        history.extend(res.history)  # restricted values equal Q of the embedded vector (offset)
        rounds += 1
        if rounds >= max(cfg.active_set_rounds, 1):
            break
        # outlier search: full IHT steps from s with L = 2 L_A, L_A, L_A / 2, ...
        L_try = 2.0 * res.info["L"]
        d = obj.direction_vec(op, s.w, s.yhat)
        best, grew = s, False
        for _ in range(cfg.outlier_search):
            x, m, yh, f = _plain_step(obj, op, s.w, s.yhat, k, L_try, d)
            outside = m & ~active
            if bool(outside.any()) and f < best.f:
                best, grew = _State(x, m, yh, f), True
            elif f >= best.f and (bool(outside.any()) or cfg.support_steps != "cg"):
                # cg converges on the active set, where a step that stays inside it cannot lower Q:
                # ending there (CHITA's rule) would never grow the set, so only larger steps decide
                break
            L_try /= 2.0
        if not grew:
            break
        outliers_total += int((best.mask & ~active).sum())
        active = active | best.mask
        s = best
        w = s.w
        history.append(s.f)
    info = {"iterations": iterations, "active_set_rounds": rounds, "active_set_size": int(active.sum()),
            "outliers_added": outliers_total, "L": L, "stop": stop, "capped": capped,
            "stops": ",".join(stops), "rounds_capped": stops.count("max_iter")}
    return SolveResult(s.w, s.mask, s.f, history, info)


def backsolve(obj: PlanRegression, op: GradientOperator, w0: torch.Tensor, k: int, cfg: SolverConfig,
              mask: torch.Tensor | None = None) -> SolveResult:
    """CHITA Heuristic_LS: fix a support (`mask`, or chosen by `cfg.backsolve_support`), then the
    exact ridge minimiser of Q on it, (G_S^T Omega G_S + mu I) w_S = c with mu = N lam and
    c = G_S^T Omega z + mu w_bar_S."""
    if mask is not None:
        k = int(mask.sum())
    elif cfg.backsolve_support == "magnitude":
        mask = topk_mask(obj.w_bar.abs().to(torch.float64), k)
    else:
        L = obj.lipschitz(op, cfg.power_iters)
        yhat0 = op.matvec(w0).to(w0.dtype)
        _, mask, _, _ = _plain_step(obj, op, w0, yhat0, k, L)
    dtype, dev, f64 = w0.dtype, w0.device, torch.float64
    if k == 0:
        return _embed_backsolve(obj, op, mask, torch.zeros(0, dtype=dtype, device=dev), dtype, "empty")
    if k > obj.n and obj.nlam <= 0:
        raise ConfigError("method.lam", cfg.lam, "> 0 for algorithm=backsolve when N < k",
                          "makes the support system singular")
    GS = _SupportColumns(op, mask.nonzero().squeeze(1), dev)
    omega64 = obj.omega.to(dev, f64)
    c = GS.t(omega64 * obj.z.to(dev, f64)) + obj.nlam * obj.w_bar[GS.idx].to(dev, f64)
    route = "primal" if k <= obj.n else "woodbury"
    wS, dt, steps, resid = _refined_solve(GS, omega64, obj.nlam, c, route, dtype, cfg.lam)
    res = _embed_backsolve(obj, op, mask, wS.to(dtype), dtype, route)
    res.info.update(backsolve_factor=str(dt).removeprefix("torch."), backsolve_refinements=steps,
                    backsolve_residual=resid)
    return res


class _SupportColumns:
    """G_S, the columns `idx` of G, for products in any dtype on `dev`.

    Gathered once when a dense copy fits the operator's resident budget (unbounded: when it is at
    most half of G, as `restrict` copies): the refined solve takes several products with G_S, and
    each gather (a disk read for a stored G) costs more than the product itself. Otherwise streamed
    by column chunks (N < k can exceed memory)."""

    def __init__(self, op: GradientOperator, idx: torch.Tensor, dev: torch.device):
        self.op, self.idx, self.dev, self.n = op, idx, dev, op.num_rows
        budget = op.max_resident_bytes
        fits = (2 * idx.numel() <= op.num_cols if budget is None
                else self.n * idx.numel() * op.dtype.itemsize <= budget)
        self.dense = op.dense_columns(idx.cpu()).to(dev) if fits else None

    def chunks(self, to: torch.dtype) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.dense is None:
            for pos, cols in self.op.column_chunks(self.idx.cpu()):
                yield pos.to(self.dev), cols.to(device=self.dev, dtype=to)
            return
        for lo in range(0, self.idx.numel(), COLUMN_CHUNK):  # cast chunk by chunk: no second full copy
            hi = min(lo + COLUMN_CHUNK, self.idx.numel())
            yield torch.arange(lo, hi, device=self.dev), self.dense[:, lo:hi].to(to)

    def matrix(self, to: torch.dtype) -> torch.Tensor:
        """G_S as one (N, k) tensor (the primal route, k <= N)."""
        if self.dense is not None:
            return self.dense.to(to)
        return self.op.dense_columns(self.idx.cpu(), to).to(self.dev)

    def t(self, r: torch.Tensor) -> torch.Tensor:
        """G_S^T r in r's dtype."""
        out = torch.empty(self.idx.numel(), dtype=r.dtype, device=self.dev)
        for pos, cols in self.chunks(r.dtype):
            out[pos] = cols.T @ r
        return out

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        """G_S v in v's dtype."""
        out = torch.zeros(self.n, dtype=v.dtype, device=self.dev)
        for pos, cols in self.chunks(v.dtype):
            out += cols @ v[pos]
        return out


def _support_solver(GS: _SupportColumns, omega64: torch.Tensor, mu: float, route: str, dt: torch.dtype,
                    lam: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """An approximate solver of (G_S^T Omega G_S + mu I) x = rhs from a factorisation in `dt`
    (float64 in and out): the k x k system (primal) or the N x N Woodbury form."""
    om = omega64.to(dt)
    if route == "primal":
        A = GS.matrix(dt)
        H = A.T @ (om[:, None] * A)
        H.diagonal().add_(mu)
        chol = _spd_factor(H)
        return lambda rhs: _spd_apply(chol, rhs.to(dt), lam).to(torch.float64)
    K = torch.zeros(GS.n, GS.n, dtype=dt, device=GS.dev)
    for _, cols in GS.chunks(dt):
        K += cols @ cols.T
    sq = om.clamp_min(0).sqrt()
    M = sq[:, None] * K * sq[None, :]
    M.diagonal().add_(mu)
    chol = _spd_factor(M)

    def woodbury(rhs: torch.Tensor) -> torch.Tensor:  # (rhs - G_S^T sq u) / mu
        u = _spd_apply(chol, sq * GS.mv(rhs.to(dt)), lam)
        return (rhs - GS.t(sq * u).to(torch.float64)) / mu
    return woodbury


def _refined_solve(GS: _SupportColumns, omega64: torch.Tensor, mu: float, c: torch.Tensor, route: str,
                   dtype: torch.dtype, lam: float) -> tuple[torch.Tensor, torch.dtype, int, float]:
    """Mixed-precision iterative refinement: factorise in G's dtype (fast), take the residual
    c - H w_S in float64; if that does not converge, factorise in float64. In float32 alone the
    Woodbury form subtracts nearly equal vectors and, on ill-conditioned G (ResNet-20), its answer
    was above the IHT iterate it was meant to improve (the finish was then silently skipped).
    Returns w_S (float64), the factorisation dtype used, the refinement steps and the relative residual."""
    tol = 1e-10 * float(c.norm())
    steps = 0
    for dt in dict.fromkeys((dtype, torch.float64)):
        approx = _support_solver(GS, omega64, mu, route, dt, lam)
        wS, last = approx(c), math.inf
        for _ in range(10):
            resid = c - (GS.t(omega64 * GS.mv(wS)) + mu * wS)
            size = float(resid.norm())
            if size <= tol or not size < 0.5 * last:
                break
            last, steps = size, steps + 1
            wS = wS + approx(resid)
        if size <= 1e3 * tol:
            break
    return wS, dt, steps, size / max(float(c.norm()), 1e-300)


def _embed_backsolve(obj: PlanRegression, op: GradientOperator, mask: torch.Tensor, wS: torch.Tensor,
                     dtype: torch.dtype, route: str) -> SolveResult:
    w = torch.zeros(op.num_cols, dtype=dtype, device=mask.device)
    w[mask] = wS
    yhat = op.matvec(w).to(dtype)
    f = obj.value(w, yhat)
    return SolveResult(w, mask, f, [f], {"iterations": 0, "backsolve": route})


def _spd_factor(A: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The Cholesky factor of A, or A itself (a general solve) when it is not numerically SPD."""
    L, info = torch.linalg.cholesky_ex(A)
    return ("chol", L) if int(info) == 0 else ("lu", A)


def _spd_apply(fac: tuple[str, torch.Tensor], b: torch.Tensor, lam: float) -> torch.Tensor:
    kind, M = fac
    if kind == "chol":
        return torch.cholesky_solve(b[:, None].to(M.dtype), M).squeeze(1)
    try:
        return torch.linalg.solve(M, b.to(M.dtype))
    except RuntimeError as exc:
        raise ConfigError("method.lam", lam, "a larger value", f"leaves the support system singular ({exc})") from None


def solve(op: GradientOperator, y: torch.Tensor, w_bar: torch.Tensor, w0: torch.Tensor, k: int, plan: Plan,
          cfg: SolverConfig, direction: str = "paper") -> SolveResult:
    """min Q(w) s.t. ||w||_0 <= k from the start w0, with the algorithm of `cfg`.

    `op` is G (any `GradientOperator`; a `GradientMatrix` in the pipeline), y = G w_bar, `plan` the
    transport plan (IdentityPlan for LR). Computation runs in `cfg.precision`; w is returned in
    w0's dtype.
    """
    p = op.num_cols
    if not 0 <= k <= p:
        raise ValueError(f"k={k} is outside [0, {p}]")
    out_dtype = w0.dtype
    dtype = cfg.compute_dtype(op)
    op = cast_operator(op, dtype)
    dev = op.device
    w0c, w_bar_c, yc = w0.to(dev, dtype), w_bar.to(dev, dtype), y.to(dev, dtype)
    obj = PlanRegression(yc, w_bar_c, cfg.lam, plan, direction)
    dropped = 0
    if cfg.drop_zero_columns and 0 < k < p:
        nz = nonzero_columns(op).to(dev)
        dropped = p - int(nz.sum())
        if dropped and int(nz.sum()) > k:  # else every non-zero column is kept: solve as is
            idx = nz.nonzero().squeeze(1)
            sub = _solve(obj.restrict(idx), op.restrict(idx), w0c[idx], k, cfg)
            res = SolveResult(torch.zeros_like(w0c), torch.zeros(p, dtype=torch.bool, device=dev), sub.objective,
                              sub.history, sub.info)
            res.w[idx], res.mask[idx] = sub.w, sub.mask
        else:
            dropped = 0
    if not dropped:
        res = _solve(obj, op, w0c, k, cfg)
    res.info["dropped_columns"] = dropped
    if 0 < k < p:  # with k = p nothing is pruned (SWAP's first stage): staying put is not a failure
        res.info.update(progress_info(res, w0c, k))
    res.w = (res.w * res.mask).to(w0.device, out_dtype)
    res.mask = res.mask.to(w0.device)
    return res


def progress_info(res: SolveResult, w0: torch.Tensor, k: int) -> dict[str, Any]:
    """`no_progress`: the solver returned H_k(w0), its own starting point (for a one-shot prune
    from the dense anchor that is magnitude pruning), so its objective did nothing; the reason is
    the stop reason of the last IHT-LS run (e.g. no_descent), or `no_step` (no step was accepted)."""
    x0, _ = _hard_threshold(w0, k)
    same = bool(torch.equal(res.w * res.mask, x0.to(res.w.dtype)))
    info: dict[str, Any] = {"no_progress": same}
    if same:
        stop = res.info.get("stop")
        info["no_progress_reason"] = stop if stop not in (None, "max_iter", "ftol") else "no_step"
    return info


def _solve(obj: PlanRegression, op: GradientOperator, w0: torch.Tensor, k: int, cfg: SolverConfig) -> SolveResult:
    """The algorithm of `cfg`, then the optional exact backsolve on the final support."""
    p = op.num_cols
    if k == 0:
        w = torch.zeros_like(w0)
        f = obj.value(w, torch.zeros_like(obj.y))
        return SolveResult(w, torch.zeros(p, dtype=torch.bool, device=w0.device), f, [f], {"iterations": 0})
    if cfg.algorithm == "backsolve":
        return backsolve(obj, op, w0, k, cfg)
    res = iht_ls(obj, op, w0, k, cfg) if cfg.algorithm == "iht" else active_set_iht(obj, op, w0, k, cfg)
    res.info["max_iter_hit"] = bool(res.info.pop("capped", res.info.get("stop") == "max_iter"))
    if cfg.finish == "backsolve":
        fin = backsolve(obj, op, w0, k, cfg, mask=res.mask)
        res.info.update(objective_iht=res.objective, finish=fin.info["backsolve"],
                        **{key: v for key, v in fin.info.items() if key.startswith("backsolve_")})
        if fin.objective <= res.objective:  # the exact minimiser on the support; guards rounding only
            res.w, res.objective = fin.w, fin.objective
            res.history.append(fin.objective)
    return res


def nonzero_columns(op: GradientOperator) -> torch.Tensor:
    """(p,) bool: the columns of G with a non-zero entry (read chunk by chunk)."""
    out = torch.zeros(op.num_cols, dtype=torch.bool)
    for pos, cols in op.column_chunks(torch.arange(op.num_cols)):
        out[pos] = (cols != 0).any(0).cpu()
    return out


# ------------------------------------------------------------------ the regression lr and swap share
def regression_problem(problem: Any, sparsity: float, cfg: SolverConfig, method: str,
                       targets: bool = True) -> tuple[Any, int, torch.Tensor, torch.Tensor | None]:
    """What lr and swap both regress on, from a `pruning.methods.base.PruningProblem`: G (cast to the
    solver's precision), k = floor((1 - s) p), w_bar and the targets y = G w_bar (None when
    `targets` is false: lr's blocks form their own)."""
    from pruning.layout import num_kept

    if problem.grads is None:
        raise ConfigError("method", method, "a run that computes the gradient matrix", "needs problem.grads")
    op = cast_operator(problem.grads, cfg.compute_dtype(problem.grads))
    k = num_kept(op.num_cols, sparsity)
    w_bar = problem.w_bar.to(problem.w.device, problem.w.dtype)
    return op, k, w_bar, op.matvec(w_bar) if targets else None


def solve_info(res: SolveResult, k: int, algorithm: str, seconds: float) -> dict[str, Any]:
    """The per-stage record of a solve: scalars (recorded in result.json) plus the history."""
    info: dict[str, Any] = {"objective": res.objective, "objective_start": res.history[0] if res.history else None,
                            "k": k, "algorithm": algorithm, "solve_seconds": round(seconds, 4),
                            "history": list(res.history)}
    info.update({key: v for key, v in res.info.items() if isinstance(v, int | float | str | bool)})
    return info

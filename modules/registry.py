"""The one registry of decompositions. Every stage asks it: which statistics a --method needs, how many
parameters a rank keeps, which rank a ratio buys, and which module the layer becomes.

A method is one `Method` entry below; its math lives in modules/decompositions.py (SVD family, IDs,
CUR variants) and modules/cur_math.py (the seed's ACUR), its module in modules/low_rank_linear.py or
modules/cur_linear.py. Adding a method: one entry here, its branch in low_rank_linear.prepare_layer /
factor_layer if it is a new form, and its tests. Pure Python: no torch, so the search can count
parameters without loading anything.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# forms: how a method's factors are stored, which fixes the parameter count at rank k. "structured" keeps
# whole neurons / KV groups of a block (structured.py): each linear keeps k of its rows or columns as a
# plain smaller nn.Linear; counted here as k kept rows of m (the walk cuts the side the block needs)
FORMS = ("cur", "svd", "rowid", "colid", "structured")
SEED_SELECTIONS = ("topk", "sample")          # the seed's CURLinear.from_linear path
SELECTIONS = SEED_SELECTIONS + ("deim",)
SEED_U_MODES = ("pinv", "act_weighted")
U_MODES = SEED_U_MODES + ("data_aware",)
DEFAULT_COV_DAMP = 0.01


@dataclass(frozen=True)
class Method:
    name: str
    form: str                 # one of FORMS
    summary: str
    scale: str = "none"       # activation statistic: "none" (never read), "optional" (--act_aware), "required"
    covariance: bool = False  # fits to the input covariance E[x x^T]
    sequential: bool = False  # fitted block by block on the inputs the already-compressed model produces
    correct: bool = False     # sequential fit targets the dense model's output (undoes earlier layers' error)
    fisher: bool = False      # output rows weighted by the loss's sensitivity to them (output fisher)
    shrink: bool = False      # covariance shrunk toward its diagonal by the calibration token count
    bias: bool = False        # structured: the refitted down_proj / o_proj gains an intercept (centred moments)

    @property
    def per_linear(self) -> bool:
        """True when every linear becomes its own low-rank module (low_rank_linear.compress_linear);
        False for the structured form, which slices whole neurons and heads of a block (structured.py)."""
        return self.form != "structured"

    def needs_covariance(self, u_mode: str = "pinv") -> bool:
        """The data-aware U of the CUR forms reads the covariance too."""
        return self.covariance or (self.form == "cur" and u_mode == "data_aware")

    def param_count(self, m: int, n: int, k: int) -> int:
        """Parameters (without bias) kept for an m x n weight at rank k."""
        if self.form == "cur":
            return m * k + k * k + k * n
        if self.form == "svd":
            return k * (m + n)
        if self.form == "structured":
            return k * n
        return k * (m + n - k)  # interpolative forms: the k x k identity block is not stored

    def rank(self, m: int, n: int, ratio: float, rank_align: int = 1) -> int:
        """Largest rank whose parameters stay within ratio * m * n (a multiple of rank_align when
        one fits; else the largest rank that fits, at least 1)."""
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if rank_align < 1:
            raise ValueError(f"rank_align must be >= 1, got {rank_align}")
        budget = ratio * m * n
        if self.form == "structured":  # k of m rows: no rank cap at min(m, n)
            k = max(int(math.floor(ratio * m + 1e-9)), 1)
            aligned = (k // rank_align) * rank_align
            return aligned if aligned > 0 else k
        if self.form == "cur":  # positive root of k^2 + (m+n)k - budget
            k = int(math.floor((-(m + n) + math.sqrt((m + n) ** 2 + 4 * budget)) / 2))
        elif self.form == "svd":
            k = int(budget // (m + n)) + 1
        else:  # smaller root of k^2 - (m+n)k + budget; k(m+n-k) grows up to k = min(m, n)
            k = int(math.floor(((m + n) - math.sqrt(max((m + n) ** 2 - 4 * budget, 0.0))) / 2)) + 1
        k = min(k, m, n)
        while k > 0 and self.param_count(m, n, k) > budget:  # guard against round-off
            k -= 1
        aligned = (k // rank_align) * rank_align
        return max(aligned if aligned > 0 else k, 1)

    def params(self, m: int, n: int, ratio: float, rank_align: int = 1) -> int:
        """Parameters one layer keeps at a ratio: dense at 1.0, else the count at the ratio's rank."""
        return m * n if ratio >= 1 else self.param_count(m, n, self.rank(m, n, ratio, rank_align))

    def ratio_of_rank(self, m: int, n: int, k: int) -> float:
        """The smallest ratio whose rank is k (rank(m, n, ratio_of_rank(k)) == k for unaligned ranks)."""
        return min(1.0, self.param_count(m, n, k) / (m * n))


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("acur", "cur", "the seed's activation-aware CUR: C U R with leverage-score picks on W diag(s^alpha)",
           scale="optional"),
    Method("cur", "cur", "plain CUR (never activation scaled)"),
    Method("svd", "svd", "truncated SVD of W"),
    Method("asvd", "svd", "ASVD: SVD of W diag(s^alpha) (needs --act_aware)", scale="required"),
    Method("wsvd", "svd", "whitened SVD: SVD of W L, L L^T = input covariance (the rank-k output-error optimum)",
           covariance=True),
    Method("rowid", "rowid", "row interpolative decomposition: k actual rows R, the others Z R fitted to "
           "the output error", covariance=True),
    Method("colid", "colid", "column interpolative decomposition: k actual columns C, Z = C+ W",
           covariance=True),
    Method("srid", "rowid", "sequential Fisher-weighted row ID: actual rows picked by the loss-weighted "
           "output error, the others fitted block by block on the compressed model's inputs, covariance "
           "shrunk by the token count", covariance=True, sequential=True, fisher=True, shrink=True),
    Method("neurons", "structured", "structured CUR of the MLPs: keep whole intermediate neurons (rows of gate/up, "
           "columns of down), refit down_proj on the kept activations block by block; attention stays dense",
           covariance=True, sequential=True, fisher=True, shrink=True),
    Method("structured", "structured", "structured CUR of MLPs and attentions: whole neurons and whole KV groups "
           "(with their query heads) kept, down_proj / o_proj refitted; a plain smaller model",
           covariance=True, sequential=True, fisher=True, shrink=True),
)}


ABLATION_FLAGS = ("sequential", "correct", "fisher", "shrink", "bias")


def variant(base: str, **flags: bool) -> Method:
    """A registered copy of `base` with some of its ideas switched off or on, named after what changed
    (e.g. "srid[sequential=0]"): what an ablation compares, through the same stages as any method."""
    bad = set(flags) - set(ABLATION_FLAGS)
    if bad:
        raise ValueError(f"unknown method flags {sorted(bad)}; choose from {', '.join(ABLATION_FLAGS)}")
    spec = get(base)
    name = base + "[" + ",".join(f"{k}={int(v)}" for k, v in sorted(flags.items())) + "]"
    METHODS[name] = dataclasses.replace(spec, name=name, **flags)
    return METHODS[name]


def get(name: str) -> Method:
    """The registry entry of a --method; one clear error for an unknown name."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def is_seed_cur(method: str, selection: str, u_mode: str) -> bool:
    """The seed's CURLinear.from_linear path, kept verbatim so --method acur's numbers never move."""
    return get(method).form == "cur" and selection in SEED_SELECTIONS and u_mode in SEED_U_MODES

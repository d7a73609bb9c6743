"""Configuration of the feature contract: sequence caps and the S_all layout.

``S_all`` (paper Eq. 2) is a fixed-length token sequence made of four segments,
each a fixed slot range of the sequence, laid out oldest -> newest so that the
encoder's causal mask follows time:

    [ NN(S_LL, c) | NN(S_RT[r:], c) | S_RT[:r] | NN(S_imp, c) ]
      k_ll          k_rt              r          k_imp

Differences from the paper's written order, and why:
- The paper writes NN(S_RT[:r], c); that set is already inside S_RT[:r], so the
  realtime NN search runs over the rest of S_RT, S_RT[r:].
- Segments are disjoint in time: lifelong tokens at or after the oldest token of
  S_RT are not searched (they are in the realtime segments already). So every
  token before S_RT[:r] is older than it, and under the causal mask the position
  of action t sees only earlier actions -- the Next Action Loss target (t + 1) and
  the impression negatives, which come last, never leak into u(t).
- Inside a segment, tokens run oldest -> newest, and short segments are padded at
  their start, so a segment's newest token always sits in its last slot.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

SEGMENTS: tuple[str, ...] = ("ll_nn", "rt_nn", "rt_recent", "imp_nn")

DAY_MS: int = 86_400_000


@dataclass(frozen=True)
class FeatureConfig:
    """Caps of the three sequences and sizes of the S_all segments.

    Attributes:
        ll_cap: L_LL, most recent explicit actions kept in the lifelong sequence.
        rt_cap: length of the realtime sequence S_RT.
        imp_cap: length of the impression sequence S_imp.
        k_ll: K of NN(S_LL, c).
        k_rt: K of NN(S_RT[r:], c).
        r: number of most recent realtime actions always kept, S_RT[:r].
        k_imp: K of NN(S_imp, c).
        ll_refresh_ms: S_LL is a batch feature refreshed every ``ll_refresh_ms``;
            a request at t sees the snapshot taken at ``floor(t / ll_refresh_ms)``.
            0 means an exact point-in-time lifelong sequence.
    """

    ll_cap: int = 16_384
    rt_cap: int = 100
    imp_cap: int = 100
    k_ll: int = 96
    k_rt: int = 32
    r: int = 32
    k_imp: int = 32
    ll_refresh_ms: int = DAY_MS

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"FeatureConfig.{name} must be a non-negative int, got {value!r}")
        if self.r > self.rt_cap:
            raise ValueError(f"FeatureConfig.r ({self.r}) must not exceed rt_cap ({self.rt_cap})")
        if self.seq_len == 0:
            raise ValueError("FeatureConfig: S_all would be empty (all segment sizes are 0)")

    @property
    def segment_sizes(self) -> tuple[int, int, int, int]:
        """Slot count of each segment, in :data:`SEGMENTS` order."""
        return (self.k_ll, self.k_rt, self.r, self.k_imp)

    @property
    def segment_starts(self) -> tuple[int, int, int, int]:
        s = self.segment_sizes
        return (0, s[0], s[0] + s[1], s[0] + s[1] + s[2])

    @property
    def seq_len(self) -> int:
        """|S_all| (paper: 192)."""
        return sum(self.segment_sizes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "feature_config") -> FeatureConfig:
        """Inverse of :meth:`to_dict`; ``where`` names the source in errors. A field this
        code does not know (rows or a model written by another version) is refused by
        name: silently dropping it could change what S_all means."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"{where}: field {extra[0]!r} = {d[extra[0]]!r} is not a FeatureConfig "
                             f"field of this code (it has {', '.join(sorted(known))})")
        return cls(**d)

    def check_same(self, other: FeatureConfig, mine: str, theirs: str,
                   hint: str = "rows must be logged with the model's FeatureConfig") -> None:
        """ValueError naming the first differing field and both values, e.g.
        ``feature config: k_ll = 64 in the rows x.parquet, 96 in the model m/``."""
        a, b = self.to_dict(), other.to_dict()
        for name in a:
            if a[name] != b[name]:
                raise ValueError(f"feature config: {name} = {a[name]!r} in {mine}, {b[name]!r} in {theirs} "
                                 f"({hint})")

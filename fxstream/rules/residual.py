"""Residual joins: the covariance between a skip path and the branch it skips.

``h + f(h)`` adds two functions of one tensor, and the add rule treats them as
independent. To first order Cov(h, f(h)) = S_h J_f^T, whose diagonal under
diagonal activations is v_h * diag(J_f), so

    var(h + f(h)) = v_h + var f(h) + 2 v_h * diag(J_f).

Trained branches partly cancel what they receive (diag(J_f) < 0), so without
the last term the variances come out too large: SmolLM2-135M's logit variances
were 1.75x Monte Carlo's. With ``residual="linearised"`` the pair pass adds it
for every branch whose Jacobian diagonal can be had without forming J_f: ops
that act per element (elementwise ops, views that keep the last dim, eval
dropout, layer norm with its statistics at the mean) around at most two linear
maps, one into the branch and one back out:

    after the first map M:   J = sum_t diag(a_t) M_t diag(g_t)        (a term per map)
    after the second, M2:    diag(J) = sum_t (a_t @ (M2^T o M_t)) * g_t (one GEMM per term)

The same holds for two stride-1 convolutions K1 (kernel W1) and K2 (W2) with
per-element ops (batch norm, activations) around them, a ResNet basic block:
J = sum_t diag(a_t) K1 diag(g_t) after the first, and after the second

    diag(J) = sum_t conv(a_t, P) * g_t,   P[c, c1, q] = W2[c, c1, q] W1[c1, c, r(q)]

where r(q) is the tap of W1 that leads from output position p, through tap q
of W2, back to input position p: one convolution of K2's size per term.

Attention branches (x -> V projection -> heads -> attention -> heads merged ->
output projection) under the paper's attention rule, where P is held at the
mean: out_t = sum_s P_ts v_s, and since the maps act per token, only each
token's weight on itself, P_tt, leads back to diag(J). So between the two maps
the form follows the elements through the layout ops (views, transposes, a
fused QKV projection's split, GQA's repeated heads; :class:`Placed`) and the
attention scales it by diag(P):

    diag(J)[t, i] = sum_j W_o[i, j] P_{h(j), tt} a[t, j] W_v[k(j), i] g[t, i]

(k(j): the value feature that output feature j reads, found once at build
time). Under attention="linearised" the queries and keys would add, per token,
an E x E Jacobian per head, which no such form carries.

The Jacobian is carried as such a form through the branch, evaluated at the
means the graph already holds. A branch with anything else keeps the
independent add: a third map (bottleneck and inverted-residual blocks) would
need, at every position, a sum over two hidden layers' channels; a downsampling
shortcut puts maps on both paths; Phi-3's fused gate/up projection multiplies
two pieces of one map. :func:`warn_uncovered_joins` says once per graph how
many joins were left and why.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Union

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.node import map_aggregate

from .attention import attention_probabilities
from .linearise import derivative
from .norm import layer_statistics
from .patterns import SOFTMAX, TRANSPARENT
from .region import ELEMENTWISE_OPS, number_overload
from .registry import same_shape

aten = torch.ops.aten

#: ops that pass every element through unchanged (in eval mode), in any layout keeping the last dim.
PASS_THROUGH = frozenset(TRANSPARENT) | {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
PER_ELEMENT = ELEMENTWISE_OPS | {aten._to_copy.default}
LINEAR_MAPS = frozenset({aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default})
CONVOLUTIONS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})
MIXING = frozenset({*SOFTMAX, aten.scaled_dot_product_attention.default})
#: ops that move elements without changing their values (a Chain's ``a`` follows them; see Placed)
MOVES = PASS_THROUGH | {aten.transpose.int, aten.permute.default, aten.expand.default, aten.unsqueeze.default,
                        aten.squeeze.dim, aten.squeeze.dims, aten.split.Tensor, aten.split_with_sizes.default,
                        aten.slice.Tensor, aten.t.default, aten.repeat_interleave.self_int}
#: token mixing whose diagonal part scales the values' form: attention (paper rule), P @ V with P at the mean
TOKEN_MIXING = frozenset({aten.scaled_dot_product_attention.default, aten.matmul.default})
BATCH_NORMS = frozenset({aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default})
THIRD_MAP = ("more than two linear maps or convolutions (a bottleneck or inverted-residual branch): its "
             "diag(J_f) would need, at every position, a sum over the channels of two hidden layers")
JOINS = {aten.add.Tensor: 1.0, aten.sub.Tensor: -1.0}


class NotCarried(Exception):
    """The branch has an op whose Jacobian the forms below cannot carry."""


@dataclass
class Diagonal:
    """J = diag(d) (``exact``), or only the diagonal d of J is known (after the second map)."""

    d: torch.Tensor
    exact: bool


@dataclass
class Chain:
    """J = sum_t diag(a_t) M_t diag(g_t); a_t (rows, K) or None for ones, M_t (K, n), g_t (rows, n)."""

    terms: dict[str, tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Conv:
    """A stride-1 convolution's kernel and geometry (``padding``, ``dilation``: one entry per spatial dim)."""

    weight: torch.Tensor
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def dense(self) -> torch.Tensor:
        """The kernel (Cout, Cin, *k) with the zeros between groups filled in."""
        if self.groups == 1:
            return self.weight
        c_out, c_in = self.weight.shape[0], self.weight.shape[1] * self.groups
        blocks = self.weight.reshape(self.groups, c_out // self.groups, *self.weight.shape[1:]).unbind(0)
        dense = self.weight.new_zeros(c_out, c_in, *self.weight.shape[2:])
        step_out, step_in = c_out // self.groups, self.weight.shape[1]
        for g, block in enumerate(blocks):
            dense[g * step_out:(g + 1) * step_out, g * step_in:(g + 1) * step_in] = block
        return dense

    def centre(self, dim: int) -> int | None:
        """The kernel tap that reads an output position's own input position along ``dim`` (None: none)."""
        tap, rest = divmod(self.padding[dim], self.dilation[dim])
        return tap if rest == 0 and tap < self.weight.shape[2 + dim] else None


@dataclass
class ConvChain:
    """J = sum_t diag(a_t) K_t diag(g_t) with K_t a convolution; a_t (its output's shape) or None for
    ones, g_t of the branch input's shape (N, C, *spatial)."""

    terms: dict[str, tuple[torch.Tensor | None, Conv, torch.Tensor]]


@dataclass
class Placed:
    """A Chain whose elements ops have moved: J = sum_t diag(a_t) R_t M_t diag(g_t), a_t in the current
    tensor's layout (its shape) and R_t the layout ops since the map. ``where_t`` (build time only, else
    None) holds, per element, its flat index row * K + k into the map's output, so that the second map
    can check that every element is back in its own row and find the feature k it came from.
    ``mixed``: a token-mixing op (attention) has been passed; only its diagonal (each token's weight on
    itself) is kept, which is exact for diag(J) as long as nothing after it mixes tokens again."""

    terms: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]
    mixed: bool = False


@dataclass
class Pieces:
    """The forms of the outputs of a split."""

    forms: list


Form = Union[Diagonal, Chain, ConvChain, Placed]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _scaled(form: Form, e: torch.Tensor) -> Form:
    """diag(e) J."""
    if isinstance(form, Placed):
        return Placed({k: (e * a, w, m, g) for k, (a, w, m, g) in form.terms.items()}, form.mixed)
    if isinstance(form, ConvChain):
        return ConvChain({k: (e if a is None else e * a, c, g) for k, (a, c, g) in form.terms.items()})
    e = _rows(e)
    if isinstance(form, Diagonal):
        return Diagonal(e * form.d, form.exact)
    return Chain({k: (e if a is None else e * a, m, g) for k, (a, m, g) in form.terms.items()})


def _sum(first: Form, second: Form) -> Form:
    if isinstance(first, Placed) or isinstance(second, Placed):
        raise NotCarried("a branch that adds paths after moving their elements")
    if isinstance(first, Diagonal) and isinstance(second, Diagonal):
        return Diagonal(first.d + second.d, first.exact and second.exact)
    if type(first) is type(second) and isinstance(first, (Chain, ConvChain)):
        terms = dict(first.terms)  # both scaled by their op's slopes, so every a_t is a tensor
        for key, (a, m, g) in second.terms.items():
            terms[key] = (a + terms[key][0] if key in terms else a, m, g)
        return type(first)(terms)
    raise NotCarried("a branch that adds a diagonal and a mapped path")


def _through_map(form: Form, m: torch.Tensor, key: str) -> Form:
    """The form of x @ m^T: a first map starts a chain, a second one leaves only the diagonal."""
    if isinstance(form, Diagonal):
        if not form.exact:
            raise NotCarried(THIRD_MAP)
        return Chain({key: (None, m, form.d)})
    if isinstance(form, ConvChain):
        raise NotCarried("a convolution and a linear map in one branch")
    if isinstance(form, Placed):
        raise NotCarried("moved elements reaching a second map without their sources")  # see _through_placed
    total = None
    for a, first, g in form.terms.values():
        if m.shape[0] != first.shape[1]:
            raise NotCarried(THIRD_MAP)
        product = m.t() * first
        along = product.sum(0).expand_as(g) if a is None else a @ product
        total = along * g if total is None else total + along * g
    return Diagonal(total, exact=False)


def _placed(form: Form, x: torch.Tensor, recording: bool) -> Placed:
    """``form`` (of ``x``) as a Placed form, ``a`` in x's shape (and, when recording, each element's index)."""
    if isinstance(form, Placed):
        return form
    if not isinstance(form, Chain):
        raise NotCarried("an op that moves elements before the branch's first map")
    terms = {}
    for key, (a, m, g) in form.terms.items():
        a = x.new_ones(x.shape) if a is None else a.reshape(x.shape)
        where = torch.arange(x.numel(), device="cpu").reshape(x.shape) if recording else None
        terms[key] = (a, where, m, g)
    return Placed(terms)


def _moved(form: Placed, move) -> Form:
    """The same layout op applied to every term's ``a`` (and ``where``); a split gives Pieces."""
    moved = {k: (move(a), None if w is None else move(w.reshape(a.shape)), m, g) for k, (a, w, m, g) in form.terms.items()}
    first = next(iter(moved.values()))[0]
    if isinstance(first, (list, tuple)):
        return Pieces([Placed({k: (a[i], None if w is None else w[i], m, g) for k, (a, w, m, g) in moved.items()},
                              form.mixed) for i in range(len(first))])
    return Placed(moved, form.mixed)


def _through_placed(form: Placed, m: torch.Tensor, sources: dict[str, tuple[int, ...]] | None,
                    recorded: dict[str, tuple[int, ...]]) -> Form:
    """diag(J) after a second map m (out, K2) of moved elements: every element must be back in its own
    row (checked at build time, when ``where`` is known) and come from one feature k(j) of the first
    map per input feature j of the second, the same in every row: then, as for a Chain,

        diag(J)[r, i] = sum_j m[i, j] a[r, j] M[k(j), i] g[r, i].
    """
    total = None
    for key, (a, where, first, g) in form.terms.items():
        width = a.shape[-1]
        if m.shape[1] != width or m.shape[0] != first.shape[1]:
            raise NotCarried(THIRD_MAP)
        if where is not None:
            where = where.reshape(-1, width)
            rows, features = where // first.shape[0], where % first.shape[0]
            if rows.shape[0] != g.shape[0] or not bool((rows == torch.arange(rows.shape[0])[:, None]).all()) \
                    or not bool((features == features[:1]).all()):
                raise NotCarried("a branch that moves features across tokens between its maps")
            recorded[key] = tuple(features[0].tolist())
        source = recorded[key] if sources is None else sources[key]
        along = a.reshape(-1, width) @ (m.t() * first[torch.tensor(source, dtype=torch.long, device=first.device)])
        total = along * g if total is None else total + along * g
    return Diagonal(total, exact=False)


def _through_conv(form: Form, conv: Conv, x: torch.Tensor, key: str) -> Form:
    """The form of conv(x): a first convolution starts a chain, a second one leaves only the diagonal.

    With K1 (kernel W1, padding p1) and K2 (W2, p2) stride-1 convolutions, output position p of
    K2 diag(a) K1 reads hidden position p + d2 q - p2 through tap q of W2, which reads input
    position p only through the tap r of W1 with d1 r = p1 + p2 - d2 q. So

        diag(K2 diag(a) K1)[c, p] = conv(a, P)[c, p],   P[c, c1, q] = W2[c, c1, q] W1[c1, c, r(q)]

    with K2's padding and dilation: one convolution of K2's size, J never formed.
    """
    if isinstance(form, Diagonal):
        if not form.exact:
            raise NotCarried(THIRD_MAP)
        return ConvChain({key: (None, conv, form.d.reshape(x.shape))})
    if isinstance(form, Chain):
        raise NotCarried("a linear map and a convolution in one branch")
    total = None
    for a, first, g in form.terms.values():
        product = _product_kernel(conv, first)
        groups = conv.groups if conv.groups == first.groups and product.shape[0] == product.shape[1] else 1
        if groups > 1:  # both maps keep the same channel groups: so does P
            size = product.shape[0] // groups
            product = torch.cat([product[i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(groups)])
        along = _convolve(torch.ones_like(x) if a is None else a, product, conv.padding, conv.dilation, groups)
        total = along * g if total is None else total + along * g
    return Diagonal(_rows(total), exact=False)


def _product_kernel(second: Conv, first: Conv) -> torch.Tensor:
    """P[c, c1, q] = W2[c, c1, q] * W1[c1, c, r(q)], r(q) = (p1 + p2 - d2 q) / d1 (zero where no such tap)."""
    w2, w1 = second.dense(), first.dense()
    if w2.shape[0] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise NotCarried(THIRD_MAP)
    taps = w1.transpose(0, 1)  # (C, C1, *k1)
    for dim in range(w1.dim() - 2):
        k1, k2 = w1.shape[2 + dim], w2.shape[2 + dim]
        select = taps.new_zeros(k2, k1)
        for q in range(k2):
            r, rest = divmod(first.padding[dim] + second.padding[dim] - second.dilation[dim] * q, first.dilation[dim])
            if rest == 0 and 0 <= r < k1:
                select[q, r] = 1
        taps = torch.movedim(torch.tensordot(taps, select, dims=([2 + dim], [1])), -1, 2 + dim)
    return w2 * taps


def _convolve(x: torch.Tensor, weight: torch.Tensor, padding, dilation, groups: int) -> torch.Tensor:
    function = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    return function(x, weight.to(x.dtype), None, 1, list(padding), list(dilation), groups)


def _conv_diagonal(conv: Conv) -> torch.Tensor:
    """diag(K) per output channel, (C, 1, ..., 1), for a convolution that keeps its input's shape."""
    w = conv.dense()
    if w.shape[0] != w.shape[1]:
        raise NotCarried("one convolution that changes the channels")
    centre = tuple(conv.centre(dim) for dim in range(w.dim() - 2))
    if None in centre:
        return w.new_zeros(w.shape[0], *([1] * len(centre)))
    return w.diagonal()[(*centre, slice(None))].reshape(-1, *([1] * len(centre)))


def _final_diagonal(form: Form) -> torch.Tensor:
    """diag(J) of the branch's output."""
    if isinstance(form, (Placed, Pieces)):
        raise NotCarried("a branch that ends with moved elements and one linear map")
    if isinstance(form, Diagonal):
        return form.d
    if isinstance(form, ConvChain):
        total = None
        for a, conv, g in form.terms.values():
            term = _conv_diagonal(conv).to(g.dtype) * g * (1 if a is None else a)
            total = term if total is None else total + term
        return total
    total = None
    for a, m, g in form.terms.values():
        if m.shape[0] != m.shape[1]:
            raise NotCarried("one linear map that changes the width")
        term = m.diagonal() * g if a is None else a * m.diagonal() * g
        total = term if total is None else total + term
    return total


@dataclass(frozen=True)
class Step:
    """One branch op: ``target(*args, **kwargs)`` with ``Ref``s to values; its value is ``means[index]``."""

    target: object
    args: tuple
    kwargs: dict
    index: int
    held: bool


@dataclass(frozen=True)
class Ref:
    """The position of a node's mean in the tuple a branch is evaluated on."""

    index: int


class ResidualBranch(torch.nn.Module):
    """The ops from a fork h to the branch output f(h), and how to evaluate diag(J_f) on their means."""

    def __init__(self, steps: list[Step], fork: int, norm: str, attention: str = "paper") -> None:
        super().__init__()
        self.steps, self.fork, self.norm, self.attention = steps, fork, norm, attention
        #: per second map after moved elements (by step index, then term), the first map's feature each
        #: input feature reads: found at build time, where ``recording``, and kept as Python ints, which a
        #: trace records as constants (a real tensor here would meet the lower pass's fake ones)
        self.sources: dict[int, dict[str, tuple[int, ...]]] = {}
        self.recording = False
        #: per step, every value it reads (args and kwargs, nested ones too)
        self.reads = [[r.index for r in _refs((step.args, step.kwargs))] for step in steps]
        last_read = {index: position for position, reads in enumerate(self.reads) for index in reads}
        #: per step, the forms no later step reads (freed there: a branch's forms are activation-sized)
        self.done_after = [[index for index, position in last_read.items() if position == at] for at in range(len(steps))]

    def diagonal(self, means: tuple) -> torch.Tensor:
        """diag(J_f) (rows, width) at the means; raises NotCarried where the forms cannot carry it."""
        return _final_diagonal(self.form(means))

    def form(self, means: tuple) -> Form:
        """J_f at the means as one of the forms; raises NotCarried where they cannot carry it."""
        forms: dict[int, Form | NotCarried] = {self.fork: Diagonal(torch.ones_like(_rows(means[self.fork])), exact=True)}
        for step, reads, done in zip(self.steps, self.reads, self.done_after):
            if not step.held:
                formed = [(i, forms[a.index]) for i, a in enumerate(step.args) if isinstance(a, Ref) and a.index in forms]
                kept = _cat_of_one(step, means) if step.target is aten.cat.default else None
                if kept is not None and kept.index in forms:
                    forms[step.index] = forms[kept.index]
                elif len(formed) != len([index for index in reads if index in forms]):
                    forms[step.index] = NotCarried(f"{step.target} takes the branch inside a list or as a keyword")
                elif formed:
                    if step.target is aten.scaled_dot_product_attention.default and self.attention == "paper":
                        formed = [(i, form) for i, form in formed if i == 2]  # the rule reads only the values
                    if formed:
                        forms[step.index] = self._form(step, formed, means)
            for index in done:
                forms.pop(index, None)
        last = forms.get(self.steps[-1].index)
        if last is None:
            raise NotCarried("a branch output held at its mean")
        if isinstance(last, NotCarried):
            raise last
        return last

    def _form(self, step: Step, formed: list, means: tuple) -> Form | NotCarried:
        """The step's form, or the reason it has none (raised only if a later step needs it:
        statistics that a held norm reads are computed from the branch, and never needed)."""
        for _, form in formed:
            if isinstance(form, NotCarried):
                return form
        args = tuple(map_aggregate(step.args, lambda a: means[a.index] if isinstance(a, Ref) else a))
        kwargs = dict(map_aggregate(step.kwargs, lambda a: means[a.index] if isinstance(a, Ref) else a))
        try:
            return self._carry(step, args, kwargs, formed, means[step.index])
        except NotCarried as reason:
            return reason

    def recorded(self, evaluate):
        """``evaluate`` run once at build time with element indices recorded (see Placed)."""
        def run(values):
            self.recording = True
            try:
                return evaluate(values)
            finally:
                self.recording = False

        return run

    def _second_map(self, step: Step, form: Placed, m: torch.Tensor) -> Form:
        """diag(J) after a second map; while recording, the sources it found are kept for later calls."""
        recorded: dict[str, tuple[int, ...]] = {}
        done = _through_placed(form, m, None if self.recording else self.sources[step.index], recorded)
        if self.recording:
            self.sources[step.index] = recorded
        return done

    def _mixing(self, step: Step, args: tuple, kwargs: dict, formed: list) -> Form:
        """Attention on the values' moved form: each token's weight on itself, diag(P), scales it."""
        positions = [i for i, _ in formed]
        form = formed[-1][1]
        if step.target is aten.scaled_dot_product_attention.default:
            if self.attention != "paper":
                raise NotCarried("an attention branch under attention='linearised' (its queries and keys)")
            if positions[-1] != 2 or any(i not in (0, 1, 2) for i in positions):
                raise NotCarried("attention with an uncertain mask")
            q, k, v, mask = args[0], args[1], args[2], args[3] if len(args) > 3 else kwargs.get("attn_mask")
            causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
            scale = args[6] if len(args) > 6 else kwargs.get("scale")
            repeat = q.shape[-3] // v.shape[-3]
            k = k.repeat_interleave(repeat, dim=-3)
            diagonal = attention_probabilities(q, k, mask, bool(causal), scale).diagonal(dim1=-2, dim2=-1)
        else:  # P @ V with P held at its mean (eager attention under the paper's rule)
            if positions != [1] or args[0].shape[-1] != args[0].shape[-2]:
                raise NotCarried(f"{step.target} of two uncertain operands")
            repeat, diagonal = 1, args[0].diagonal(dim1=-2, dim2=-1)
        form = _placed(form, args[2] if positions[-1] == 2 else args[1], self.recording)
        if form.mixed:
            raise NotCarried("a branch that mixes tokens twice")
        moved = _moved(form, lambda t: t.repeat_interleave(repeat, dim=-3) if repeat > 1 else t)
        scaled = _scaled(moved, diagonal.unsqueeze(-1).to(moved.terms[next(iter(moved.terms))][0].dtype))
        return Placed(scaled.terms, mixed=True)

    def _carry(self, step: Step, args: tuple, kwargs: dict, formed: list, out: torch.Tensor) -> Form:
        target = step.target
        form = formed[0][1]
        if target is operator.getitem and isinstance(form, Pieces):
            return form.forms[args[1]]
        if target in MOVES and formed[0][0] == 0 and isinstance(form, (Chain, Placed)) \
                and (isinstance(form, Placed) or target not in PASS_THROUGH or out.shape[-1] != args[0].shape[-1]):
            if target is aten.dropout.default and args[2]:
                raise NotCarried("dropout in training mode")
            move = aten.reshape.default if target in (aten.view.default, aten._unsafe_view.default) else target
            return _moved(_placed(form, args[0], self.recording), lambda t: move(t, *args[1:], **kwargs))
        if (target is aten.scaled_dot_product_attention.default or (target in TOKEN_MIXING and formed[0][0] == 1)) \
                and isinstance(form, (Chain, Placed)) and len(formed) == 1:
            return self._mixing(step, args, kwargs, formed)
        if target in PASS_THROUGH:
            if (target is aten.dropout.default and args[2]) or out.shape[-1] != args[0].shape[-1]:
                raise NotCarried(f"{target} that changes the last dim or drops at random")
            if isinstance(formed[0][1], ConvChain) and out.shape != args[0].shape:
                raise NotCarried(f"{target} between two convolutions")
            return formed[0][1]
        if target is operator.getitem:  # of a batch norm's (y, mean, rstd): its forms are y's
            if args[1] != 0:
                raise NotCarried("a batch norm's statistics")
            return formed[0][1]
        if target in BATCH_NORMS:
            return _scaled(formed[0][1], _batch_norm_slope(target, args, kwargs, [i for i, _ in formed]))
        if target in CONVOLUTIONS:
            if [i for i, _ in formed] != [0]:
                raise NotCarried(f"{target} of an uncertain kernel")
            return _through_conv(formed[0][1], _conv_of(target, args, kwargs), args[0], str(step.index))
        if target in LINEAR_MAPS:
            if [i for i, _ in formed] != [1 if target is aten.addmm.default else 0] or kwargs:
                raise NotCarried(f"{target} of two uncertain operands")
            weight = args[1] if target is aten.linear.default else (args[2] if target is aten.addmm.default else args[1])
            if weight.dim() != 2:
                raise NotCarried(f"batched {target}")
            weight = weight if target is aten.linear.default else weight.t()
            if isinstance(formed[0][1], Placed):
                return self._second_map(step, formed[0][1], weight)
            return _through_map(formed[0][1], weight, str(step.index))
        if target is aten.layer_norm.default:
            if self.norm != "paper" or [i for i, _ in formed] != [0]:
                raise NotCarried("layer_norm through its statistics")
            x, shape = args[0], args[1]
            gamma = args[2] if len(args) > 2 else None
            _, inv_std = layer_statistics(x, len(shape), args[4] if len(args) > 4 else 1e-5)
            return _scaled(formed[0][1], inv_std.expand_as(x) if gamma is None else gamma * inv_std)
        if target in PER_ELEMENT:
            total = None
            for position, form in formed:
                if args[position].shape != out.shape:
                    raise NotCarried(f"{target} broadcasts an uncertain operand")
                slope = _slope(target, args, kwargs, position)
                part = _scaled(form, slope.to(out.dtype))
                total = part if total is None else _sum(total, part)
            return total
        raise NotCarried(f"{target}, an op the forms do not carry")


def _cat_of_one(step: Step, means: tuple) -> Ref | None:
    """The one non-empty piece of a cat whose other pieces are empty (a key/value cache's first call),
    which the cat passes on unchanged; None for any other cat."""
    pieces = step.args[0]
    if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, Ref) for p in pieces):
        return None
    filled = [p for p in pieces if means[p.index].numel() > 0]
    return filled[0] if len(filled) == 1 else None


def _batch_norm_slope(target, args: tuple, kwargs: dict, formed: list[int]) -> torch.Tensor:
    """gamma / sqrt(running_var + eps), broadcast to the input: eval batch norm is affine per channel."""
    if formed != [0]:
        raise NotCarried("batch norm of an uncertain scale or statistic")
    if target is aten.batch_norm.default:
        x, gamma, _, _, running_var, training, _, eps = args[:8]
        if training:
            raise NotCarried("batch norm in training mode")
    else:
        x, gamma, _, _, running_var, _, eps = args[:7]
    channel = (-1,) + (1,) * (x.dim() - 2)
    slope = torch.rsqrt(running_var + eps).reshape(channel)
    if gamma is not None:
        slope = gamma.reshape(channel) * slope
    return slope.to(x.dtype).expand_as(x)


def _conv_of(target, args: tuple, kwargs: dict) -> Conv:
    """The kernel and geometry of a convolution node (stride 1 only: a branch that returns to its
    input's shape strides nowhere, or strides and upsamples, which no form carries)."""
    names = ("stride", "padding", "dilation", "groups")
    given = dict(zip(names, args[3:]), **{k: v for k, v in kwargs.items() if k in names})
    weight = args[1]
    dims = weight.dim() - 2

    def per_dim(value, default):
        value = default if value is None else value
        return tuple(value) * (dims if len(value) == 1 else 1) if isinstance(value, (list, tuple)) else (value,) * dims

    stride, dilation = per_dim(given.get("stride"), 1), per_dim(given.get("dilation"), 1)
    if any(s != 1 for s in stride):
        raise NotCarried("a strided convolution")
    padding = given.get("padding", 0)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        if any(t % 2 for t in total):
            raise NotCarried("a 'same' convolution padded unevenly")
        padding = [t // 2 for t in total]
    return Conv(weight, per_dim(padding, 0), dilation, int(given.get("groups", 1) or 1))


def _refs(structure) -> list[Ref]:
    found: list[Ref] = []
    map_aggregate(structure, lambda a: found.append(a) if isinstance(a, Ref) else None)
    return found


def _slope(target, args: tuple, kwargs: dict, position: int) -> torch.Tensor:
    """The elementwise derivative of the op in its operand at ``position``, the others held. A product's
    is the other factor: the forward-mode derivative of mul.Tensor reads concrete sizes, which would fix
    the symbolic sizes of a lowered graph. Others by a JVP (a number operand: the Scalar overload)."""
    x = args[position]
    if target is aten.mul.Tensor:
        other = args[1 - position]
        return other.expand_as(x) if isinstance(other, torch.Tensor) else torch.full_like(x, other)
    target = number_overload(target, args)

    def op_of(h: torch.Tensor) -> torch.Tensor:
        return target(*args[:position], h, *args[position + 1:], **kwargs)

    return derivative(op_of, x)


@dataclass
class ResidualJoin:
    """An add or sub of a tensor (``fork``) and a branch computed from it, ``sign`` on the branch."""

    fork: torch.fx.Node
    inputs: list[torch.fx.Node]
    branch: ResidualBranch
    sign: float


def residual_joins(graph: torch.fx.Graph, held: set[torch.fx.Node], norm: str,
                   attention: str = "paper") -> dict[torch.fx.Node, ResidualJoin]:
    """Every add/sub of a tensor and a branch of it whose Jacobian diagonal the forms carry.

    Each candidate is evaluated once, on meta tensors of its example values'
    shapes, to find out whether its branch can be carried.
    """
    found = {}
    for node in graph.nodes:
        sign = JOINS.get(node.target) if node.op == "call_function" else None
        if sign is None or len(node.args) < 2 or not all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            continue
        scale = sign * float(node.kwargs.get("alpha", 1))  # the product of the two operands' coefficients
        first, second = node.args[:2]
        for fork, out in ((first, second), (second, first)):
            nodes = _branch(fork, out)
            join = None if nodes is None else _build(fork, nodes, held, norm, scale, attention)
            if isinstance(join, ResidualJoin):
                found[node] = join
                break
    return found


TWO_SIDED = ("maps on both paths, a(h) + f(h) (a downsampling or projection shortcut): the diagonal of "
             "Cov(a, f) needs both Jacobians off their diagonals")


def uncovered_joins(graph: torch.fx.Graph, uncertain: set[str], covered: set[str], options: dict,
                    structure: str = "diag") -> dict[torch.fx.Node, str]:
    """The add/sub nodes where two paths from one uncertain tensor meet again (method.md, "Joins") that
    ``residual="linearised"`` does not cover, each with the reason.

    ``uncertain``: names of the nodes whose covariance the pruned graph computes (activations and
    uncertain inputs, not parameters); ``covered``: names of the joins that got the covariance term
    (or, for elementwise joins, the region rule).
    """
    from .patterns import mean_only_nodes

    held = mean_only_nodes(graph, options)
    ancestors: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    for node in graph.nodes:
        below = {node} if node.name in uncertain else set()
        for arg in node.all_input_nodes:
            below |= ancestors[arg]
        ancestors[node] = below
    found = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in JOINS or node.name in covered or node.name not in uncertain:
            continue
        if len(node.args) < 2 or not all(isinstance(a, torch.fx.Node) and a.name in uncertain for a in node.args[:2]):
            continue
        first, second = node.args[:2]
        if not ancestors[first] & ancestors[second]:
            continue
        reason = TWO_SIDED
        if structure != "diag":
            reason = "activation_cov='full': the option adds diagonal terms only"
        else:
            for fork, out in ((first, second), (second, first)):
                nodes = _branch(fork, out)
                if nodes is not None:
                    built = _build(fork, nodes, held, options["norm"], 1.0, options.get("attention", "paper"))
                    reason = built if isinstance(built, str) else "the fork carries no diagonal covariance"
                    break
        found[node] = reason
    return found


def warn_uncovered_joins(graph: torch.fx.Graph, uncertain: set[str], covered: set[str], options: dict,
                         structure: str = "diag") -> None:
    """One warning naming the option, how many joins it did not cover, and why (nothing if none)."""
    missed = uncovered_joins(graph, uncertain, covered, options, structure)
    if not missed:
        return
    done = sum(1 for node in graph.nodes if node.name in covered and node.target in JOINS)
    reasons: dict[str, int] = {}
    for reason in missed.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    why = "; ".join(f"{count} with {reason}" for reason, count in reasons.items())
    warnings.warn(
        f"residual='linearised' covered {done} of {done + len(missed)} joins of two paths from one uncertain "
        f"tensor; the other {len(missed)} keep the independent add (their cross-covariance is dropped): {why}",
        stacklevel=2,
    )


def _branch(fork: torch.fx.Node, out: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes on paths from ``fork`` to ``out`` (graph order, ``out`` last), None when there are none."""
    below = {fork}
    for node in fork.graph.nodes:
        if any(n in below for n in node.all_input_nodes):
            below.add(node)
    if out is fork or out not in below:
        return None
    on_path, stack = set(), [out]
    while stack:
        node = stack.pop()
        if node not in on_path and node is not fork:
            on_path.add(node)
            stack.extend(n for n in node.all_input_nodes if n in below)
    return [n for n in out.graph.nodes if n in on_path]


def _build(fork, nodes, held, norm, sign, attention: str = "paper") -> ResidualJoin | str:
    """The join of ``fork`` and the branch ``nodes``, or why the branch cannot be carried."""
    if fork.meta.get("val") is None or nodes[-1].meta.get("val") is None:
        return "no example values"
    if not same_shape(fork.meta["val"].shape, nodes[-1].meta["val"].shape):
        return "a branch whose output is not its input's shape"
    inputs = [fork]
    branch = _branch_module(fork, nodes, inputs, held, norm, attention)
    if isinstance(branch, str):
        return branch
    problem = _carried(branch.recorded(branch.diagonal), inputs)
    if problem is not None and any(node.target in MIXING for node in nodes):
        problem = f"an attention branch with {problem}"
    return ResidualJoin(fork, inputs, branch, sign) if problem is None else problem


def _branch_module(fork: torch.fx.Node, nodes: list[torch.fx.Node], inputs: list[torch.fx.Node], held,
                   norm: str, attention: str = "paper") -> ResidualBranch | str:
    """The branch of ``nodes`` from ``fork`` (``inputs[0]``), its values referred to by their positions in
    ``inputs``, which it extends (several branches can share one list); or why it cannot be one."""
    index = {node: i for i, node in enumerate(inputs)}

    def ref(arg):
        if not isinstance(arg, torch.fx.Node):
            return arg
        if arg not in index:
            index[arg] = len(inputs)
            inputs.append(arg)
        return Ref(index[arg])

    steps = []
    for node in nodes:
        if node.op != "call_function":
            return f"a {node.op} node in the branch"
        args, kwargs = map_aggregate(node.args, ref), map_aggregate(dict(node.kwargs), ref)
        steps.append(Step(node.target, tuple(args), dict(kwargs), ref(node).index, node in held))
    return ResidualBranch(steps, index[fork], norm, attention)


def _carried(evaluate, inputs: list[torch.fx.Node]) -> str | None:
    """Why ``evaluate`` (a branch's diagonal, a product's cross term) cannot be evaluated, or None: tried
    once on meta tensors of the nodes' example shapes. Symbolic sizes are taken at their example values:
    evaluating under the graph's own fake mode would guard on them and specialise a symbolic capture
    (the planner's batch and seq)."""
    try:
        values = tuple(_example(n.meta.get("val")) for n in inputs)
        with torch.no_grad():
            evaluate(values)
    except NotCarried as reason:
        return str(reason)
    return None


def _example(value):
    """A meta tensor of ``value``'s example shape, or the example int of a (symbolic) size."""
    if isinstance(value, torch.Tensor):
        return torch.empty([_example(size) for size in value.shape], dtype=value.dtype, device="meta")
    if isinstance(value, torch.SymInt):
        if value.node.hint is None:
            raise NotCarried("a size without an example value")
        return value.node.hint
    if isinstance(value, (int, float, bool)):
        return value
    if isinstance(value, (tuple, list)):  # a batch norm's (y, mean, rstd)
        return type(value)(_example(v) if v is not None else None for v in value)
    raise NotCarried(f"an input of type {type(value).__name__}")


def residual_covariance(branch: ResidualBranch, means: tuple, fork_var: torch.Tensor, into: torch.Tensor,
                        sign: float) -> torch.Tensor:
    """``into`` (the independent add's variance) plus 2 sign v_h * diag(J_f)."""
    cross = fork_var * branch.diagonal(means).reshape(fork_var.shape).to(fork_var.dtype)
    return into + (2 * sign) * cross


residual_covariance.__name__ = residual_covariance.__qualname__ = "cov_residual_join"

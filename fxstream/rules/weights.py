"""The weight-uncertainty term of linear and conv layers, one entry per posterior kind.

For h = W x + b with W independent of the input x (mean m, covariance S),

    Cov[h] = M S M^T            (input term, in the rules)
           + Cov[(W - M) x]     (weight term, here)
           + Cov[b]             (bias term, here)

and for rows a, a' of one sample (tokens, conv positions)
Cov[(W - M) x]_{(a,k),(a',l)} = sum_ij Cov(W_ki, W_lj) E[x_ai x_a'j]. Each kind
evaluates that sum from its own structure (never forming a Kronecker product
or a dense covariance it was not given). Shapes used throughout:

- the weight as a matrix (Dout, Din): a conv kernel flattened to (Cout, Cin*k*k);
- ``x``: input rows (..., Din); ``vx``: their variances (same shape) or None;
- full: ``x`` (B, L, Din), ``s`` the input covariance (B, L, Din, L, Din) or
  None; the result is (B, L, Dout, L, Dout).

Kinds and their tensors (parameter as stored; ``d_out`` = its first dim):

- ``param_diag`` (V): one variance per entry.
- ``param_kfac`` (B, A): Cov(W_ki, W_lj) = B_kl A_ij, laplace-torch's row-major vec.
- ``param_kfac_eig`` (Q_B, Q_A, V~): W = M + Q_B W~ Q_A^T with independent
  entries of variance V~ (the exact eigen form of a Kronecker precision plus a
  prior, see fxstream.KFAC.from_eigen).
- ``param_dense`` (C): C (Dout, Din, Dout, Din) for a weight, (n, n) for a vector.
- ``param_lowrank`` (d, U): Cov = diag(d) + sum_r vec(U_r) vec(U_r)^T.
- ``param_dense_affine`` / ``param_lowrank_affine``: the same over [W | b]
  (Dout, Din + 1), weight and bias jointly; the bias then carries
  ``param_affine_bias`` with the same tensors and contributes nothing itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .registry import VARIANCE_MATMUL_DTYPE

Tensors = tuple[torch.Tensor, ...]


def _matrix(t: torch.Tensor, d_out: int) -> torch.Tensor:
    return t.reshape(d_out, -1)


def _second_moment_diag(x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """E[x_ai x_a'i] (B, L, L, Din): the second moments the diagonal entries of Cov(W) meet."""
    moments = x[:, :, None, :] * x[:, None, :, :]
    return moments if s is None else moments + s.diagonal(dim1=2, dim2=4)


def _embed_rows(per_output: torch.Tensor) -> torch.Tensor:
    """(B, L, L, Dout) -> (B, L, Dout, L, Dout), nonzero only where k = l."""
    return torch.diag_embed(per_output).permute(0, 1, 3, 2, 4)


def plus(into: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """into + term, where None stands for nothing yet."""
    return term if into is None else into + term


def matmul_into(into: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """into + a @ b for a (..., K) and b (K, N), the sum done inside the GEMM (addmm) where it can be.

    Summing variance terms as separate ops costs a full pass over the output
    each; addmm accumulates into ``into`` at no extra cost. Under the
    ``variance_matmul="bfloat16"`` option the product runs on bfloat16 operands.
    """
    reduced = VARIANCE_MATMUL_DTYPE.get()
    if reduced is not None and a.dtype != reduced:
        product = (a.to(reduced) @ b.to(reduced)).to(a.dtype)
        return plus(into, product)
    if into is None:
        return a @ b
    if b.dim() != 2 or a.dim() < 2 or into.dim() > a.dim():
        return into + a @ b
    lead = a.shape[:-1]
    if into.dim() > 1:
        if into.shape != (*lead, b.shape[1]):
            return into + a @ b
        into = into.reshape(-1, b.shape[1])
    return torch.addmm(into, a.reshape(-1, a.shape[-1]), b).reshape(*lead, b.shape[1])


BLOCKED_ABOVE_ELEMENTS = 2**22
"""Weights larger than this (16 MiB in float32) get their variance GEMMs in blocks of output rows."""
OUTPUT_BLOCK_ELEMENTS = 2**20
"""Weight elements per block of output rows in :func:`by_output_blocks` (4 MiB in float32)."""


def by_output_blocks(into: torch.Tensor | None, term: Callable, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``term(into, rows)`` for every output row of a weight w (Dout, Din) meeting input rows x.

    A weight of more than BLOCKED_ABOVE_ELEMENTS (GPT-2's 50k-vocabulary head)
    gets its variance GEMMs a block of output rows at a time: each block of w^2
    is formed while in cache and used there, w^2 never exists whole (154 MB for
    that head), and the GEMMs run faster on the blocks than whole (single-
    threaded CPU, the head's input term: 141 -> 71 ms at 2**20-element blocks,
    against 2**22). Smaller layers stay whole: cut into a few blocks, their
    GEMMs ran slower (GPT-2 all linear: 3.2x -> 3.6x the deterministic forward).
    Eagerly, and when Inductor traces for a CPU; traced for a GPU it stays one
    product. ``term(into, rows)`` returns ``into`` (None: nothing) plus the
    variances of output rows ``rows`` (a slice).
    """
    rows = max(1, OUTPUT_BLOCK_ELEMENTS // max(1, w[0].numel()))
    traced = type(w) not in (torch.Tensor, torch.nn.Parameter)
    if w.numel() <= BLOCKED_ABOVE_ELEMENTS or (traced and w.device.type != "cpu") or x.dim() < 2:
        return term(into, slice(None))
    lead = torch.broadcast_shapes(x.shape[:-1], into.shape[:-1]) if into is not None else x.shape[:-1]
    out = x.new_empty(*lead, w.shape[0])
    for start in range(0, w.shape[0], rows):
        block = slice(start, start + rows)
        out[..., block] = term(None if into is None else into[..., block], block)
    return out


def squared(w: torch.Tensor) -> torch.Tensor:
    """w^2, squared in the variance GEMMs' reduced dtype when one is set (half the bytes written)."""
    reduced = VARIANCE_MATMUL_DTYPE.get()
    return (w if reduced is None else w.to(reduced)).square()


# --- param_diag -------------------------------------------------------------

def second_moment(x: torch.Tensor, vx: torch.Tensor | None) -> torch.Tensor:
    """E[x^2] per element: what independent entries of a diagonal weight posterior meet."""
    return x.square() if vx is None else x.square() + vx


def _diag_by_rows(tensors: Tensors, x, vx):
    v = _matrix(tensors[0], tensors[0].shape[0])
    moments = second_moment(x, vx)
    return lambda into, rows: matmul_into(into, moments, v[rows].t())


def _diag_diag(tensors: Tensors, x, vx, into=None):
    return _diag_by_rows(tensors, x, vx)(into, slice(None))


def _diag_full(tensors: Tensors, x, s):
    v = _matrix(tensors[0], tensors[0].shape[0])
    return _embed_rows(torch.einsum("bxyi,ki->bxyk", _second_moment_diag(x, s), v))


def _diag_marginal(tensors: Tensors):
    return tensors[0]


def _diag_transpose(tensors: Tensors) -> Tensors:
    return (tensors[0].t(),)


def _diag_dense(tensors: Tensors):
    return torch.diag_embed(tensors[0].reshape(-1))


# --- param_kfac: B (x) A ------------------------------------------------------

def _kfac_diag(tensors: Tensors, x, vx, into=None):
    out_factor, in_factor = tensors
    scale = ((x @ in_factor) * x).sum(-1)
    if vx is not None:
        scale = scale + vx @ in_factor.diagonal()
    return plus(into, scale[..., None] * out_factor.diagonal())


def _kfac_full(tensors: Tensors, x, s):
    out_factor, in_factor = tensors
    scale = torch.einsum("bxi,ij,byj->bxy", x, in_factor, x)
    if s is not None:
        scale = scale + torch.einsum("bxiyj,ij->bxy", s, in_factor)
    return scale[:, :, None, :, None] * out_factor[None, None, :, None, :]


def _kfac_marginal(tensors: Tensors):
    out_factor, in_factor = tensors
    return torch.outer(out_factor.diagonal(), in_factor.diagonal())


def _kfac_transpose(tensors: Tensors) -> Tensors:
    return tensors[1], tensors[0]


def _kfac_dense(tensors: Tensors):
    return torch.kron(tensors[0], tensors[1])


# --- param_kfac_eig: W = M + Q_B W~ Q_A^T, W~ independent --------------------

def _rotate_input(q_in: torch.Tensor, x, cov, full: bool):
    """z = Q_A^T x with its variances (diag) or covariance (full)."""
    z = x @ q_in
    if cov is None:
        return z, None
    if full:
        return z, torch.einsum("bxiyj,ip,jq->bxpyq", cov, q_in, q_in)
    return z, cov @ q_in.square()


def _eig_diag(tensors: Tensors, x, vx, into=None):
    q_out, q_in, v_rot = tensors
    z, vz = _rotate_input(q_in, x, vx, full=False)
    return matmul_into(into, _diag_diag((v_rot,), z, vz), q_out.square().t())


def _eig_full(tensors: Tensors, x, s):
    q_out, q_in, v_rot = tensors
    z, sz = _rotate_input(q_in, x, s, full=True)
    per_output = torch.einsum("bxyi,ki->bxyk", _second_moment_diag(z, sz), v_rot)
    return torch.einsum("bxyk,pk,qk->bxpyq", per_output, q_out, q_out)


def _eig_marginal(tensors: Tensors):
    q_out, q_in, v_rot = tensors
    return q_out.square() @ v_rot @ q_in.square().t()


def _eig_transpose(tensors: Tensors) -> Tensors:
    q_out, q_in, v_rot = tensors
    return q_in, q_out, v_rot.t()


def _eig_dense(tensors: Tensors):
    q_out, q_in, v_rot = tensors
    rotation = torch.kron(q_out, q_in)
    return (rotation * v_rot.reshape(-1)) @ rotation.t()


# --- param_dense: C (Dout, Din, Dout, Din) ------------------------------------

def _dense_diag(tensors: Tensors, x, vx, into=None):
    c = tensors[0]
    own = c.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (Dout, Din, Din): Cov(W_ki, W_kj)
    var = plus(into, torch.einsum("...i,kij,...j->...k", x, own, x))
    if vx is not None:
        var = matmul_into(var, vx, own.diagonal(dim1=1, dim2=2).t())
    return var


def _dense_full(tensors: Tensors, x, s):
    c = tensors[0]
    total = torch.einsum("kilj,bxi,byj->bxkyl", c, x, x)
    if s is not None:
        total = total + torch.einsum("kilj,bxiyj->bxkyl", c, s)
    return total


def _dense_transpose(tensors: Tensors) -> Tensors:
    return (tensors[0].permute(1, 0, 3, 2),)


def _dense_dense(tensors: Tensors):
    c = tensors[0]
    n = c.shape[0] * c.shape[1] if c.dim() == 4 else c.shape[0]
    return c.reshape(n, n)


def _dense_marginal(tensors: Tensors):
    return _dense_dense(tensors).diagonal()


# --- param_lowrank: diag(d) + U U^T -------------------------------------------

def _lowrank_diag(tensors: Tensors, x, vx, into=None):
    d, u = tensors
    d_out = d.shape[0]
    factors = u.reshape(u.shape[0], d_out, -1)
    projected = torch.einsum("...i,rki->r...k", x, factors)
    var = _diag_diag((d,), x, vx, plus(into, projected.square().sum(0)))
    if vx is not None:
        var = matmul_into(var, vx, factors.square().sum(0).t())
    return var


def _lowrank_full(tensors: Tensors, x, s):
    d, u = tensors
    factors = u.reshape(u.shape[0], d.shape[0], -1)
    projected = torch.einsum("bxi,rki->rbxk", x, factors)
    total = _diag_full((d,), x, s) + torch.einsum("rbxk,rbyl->bxkyl", projected, projected)
    if s is not None:
        total = total + torch.einsum("rki,bxiyj,rlj->bxkyl", factors, s, factors)
    return total


def _lowrank_marginal(tensors: Tensors):
    d, u = tensors
    return d + u.square().sum(0)


def _lowrank_transpose(tensors: Tensors) -> Tensors:
    d, u = tensors
    return d.t(), u.transpose(1, 2)


def _lowrank_dense(tensors: Tensors):
    d, u = tensors
    factors = u.reshape(u.shape[0], -1)
    return _diag_dense((d,)) + factors.t() @ factors


@dataclass(frozen=True)
class WeightStructure:
    """How one posterior kind enters a linear map.

    ``diag(tensors, x, vx, into)`` -> ``into`` (None: nothing) plus the output
    variances (..., Dout); ``full(tensors,
    x, s)`` -> (B, L, Dout, L, Dout); ``marginal(tensors)`` -> the exact
    variance of each weight entry; ``transpose(tensors)`` -> the tensors of
    the transposed (Din, Dout) parameter, for ``x @ P`` with P stored that way
    (None: not available). ``affine``: the tensors cover [W | b]. ``dense(tensors)`` -> the
    (N, N) covariance of the parameter's N entries in row-major order (None: joint with a bias), for
    a parameter that exact joins carry as a fork (read by more than one op).
    ``by_rows(tensors, x, vx)`` -> ``term(into, rows)``, the weight term of
    output rows ``rows`` (a slice) alone, for kinds whose term is a GEMM worth
    doing a block of rows at a time (None: the term is done whole).
    """

    diag: Callable
    full: Callable
    marginal: Callable
    transpose: Callable[[Tensors], Tensors] | None
    affine: bool = False
    by_rows: Callable | None = None
    dense: Callable | None = None


WEIGHT_STRUCTURES: dict[str, WeightStructure] = {
    "param_diag": WeightStructure(_diag_diag, _diag_full, _diag_marginal, _diag_transpose, by_rows=_diag_by_rows,
                                  dense=_diag_dense),
    "param_kfac": WeightStructure(_kfac_diag, _kfac_full, _kfac_marginal, _kfac_transpose, dense=_kfac_dense),
    "param_kfac_eig": WeightStructure(_eig_diag, _eig_full, _eig_marginal, _eig_transpose, dense=_eig_dense),
    "param_dense": WeightStructure(_dense_diag, _dense_full, _dense_marginal, _dense_transpose,
                                   dense=_dense_dense),
    "param_lowrank": WeightStructure(_lowrank_diag, _lowrank_full, _lowrank_marginal, _lowrank_transpose,
                                     dense=_lowrank_dense),
    "param_dense_affine": WeightStructure(_dense_diag, _dense_full, _dense_marginal, None, affine=True),
    "param_lowrank_affine": WeightStructure(_lowrank_diag, _lowrank_full, _lowrank_marginal, None, affine=True),
}

AFFINE_BIAS = "param_affine_bias"
#: every parameter kind a linear or conv rule accepts (weights and biases).
PARAM_KINDS = tuple(WEIGHT_STRUCTURES) + (AFFINE_BIAS,)


#: posterior kinds a bias (a vector) may have; ``param_affine_bias``: carried by its weight's joint posterior.
BIAS_KINDS = ("param_diag", "param_dense", "param_lowrank", AFFINE_BIAS)


def layer_problem(weight: str | None, bias: str | None, transposed: bool = False, groups: int = 1) -> str | None:
    """Why a layer cannot combine these weight and bias posterior kinds (None: not a parameter), or None.

    ``transposed``: the weight is stored (Din, Dout) and used as ``x @ P``; ``groups``: a grouped conv.
    The rules' capability checks ask this before anything runs, so the functions below never see
    a kind they cannot handle.
    """
    structure = None if weight is None else WEIGHT_STRUCTURES.get(weight)
    if weight is not None and structure is None:
        return f"a '{weight}' posterior cannot be the weight of a linear or conv layer"
    if bias is not None and bias not in BIAS_KINDS:
        return (f"a '{bias}' posterior cannot be the bias of a linear or conv layer; give the bias a diagonal, "
                "dense or low-rank covariance")
    if (structure is not None and structure.affine) != (bias == AFFINE_BIAS):
        return ("a posterior over weight and bias jointly needs both in the same layer call; give the weight "
                "and the bias separate covariances")
    if transposed and structure is not None and structure.transpose is None:
        return (f"a '{weight}' posterior (weight and bias jointly) is only supported on linear and conv "
                "layers; give the weight and the bias separate covariances")
    if groups != 1 and weight is not None and weight != "param_diag":
        return (f"a '{weight}' kernel posterior is supported for groups=1 only; grouped and depthwise "
                "convolutions take a diagonal posterior (fxstream.Diagonal or .to_diagonal())")
    return None


def _structure(kind: str) -> WeightStructure:
    return WEIGHT_STRUCTURES[kind]


def _augment(x: torch.Tensor, cov: torch.Tensor | None, full: bool):
    """Append a deterministic 1 to every input row: [x, 1] meets [W | b]."""
    x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
    if cov is None:
        return x, None
    pad = (0, 1, 0, 0, 0, 1) if full else (0, 1)
    return x, torch.nn.functional.pad(cov, pad)


def weight_diag(kind: str, tensors: Tensors, x: torch.Tensor, vx: torch.Tensor | None,
                into: torch.Tensor | None = None) -> torch.Tensor:
    """``into`` plus the variances (..., Dout) that the weight's uncertainty adds to x @ W^T."""
    structure = _structure(kind)
    if structure.affine:
        x, vx = _augment(x, vx, full=False)
    return structure.diag(tensors, x, vx, into)


def weight_by_rows(kind: str, tensors: Tensors, x: torch.Tensor, vx: torch.Tensor | None) -> Callable | None:
    """``term(into, rows)``: the weight term of a block of output rows (None: the kind has no such split)."""
    structure = _structure(kind)
    return None if structure.by_rows is None else structure.by_rows(tensors, x, vx)


def weight_full(kind: str, tensors: Tensors, x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """Covariance (B, L, Dout, L, Dout) that the weight's uncertainty adds; x (B, L, Din)."""
    structure = _structure(kind)
    if structure.affine:
        x, s = _augment(x, s, full=True)
    return structure.full(tensors, x, s)


def transposed(kind: str, tensors: Tensors) -> Tensors:
    """The tensors of P^T for a parameter P (Din, Dout) used as ``x @ P``."""
    return _structure(kind).transpose(tensors)


def has_dense(kind) -> bool:
    """Whether a parameter posterior of this kind can be formed as one (N, N) covariance."""
    structure = WEIGHT_STRUCTURES.get(kind) if isinstance(kind, str) else None
    return structure is not None and structure.dense is not None


def dense_covariance(kind: str, cov) -> torch.Tensor:
    """The (N, N) covariance of a parameter's N entries (row-major), from its posterior's buffers."""
    return _structure(kind).dense(as_tensors(cov))


def as_tensors(cov) -> Tensors:
    """A parameter's covariance buffers as a tuple (a single buffer arrives bare)."""
    return tuple(cov) if isinstance(cov, (list, tuple)) else (cov,)


def bias_variance(kind: str | None, tensors: Tensors) -> torch.Tensor | None:
    """Per-output variances of a bias (None: deterministic, or carried by the weight)."""
    if kind is None or kind == AFFINE_BIAS:
        return None
    return marginal_variance(kind, tensors)


def bias_covariance(kind: str | None, tensors: Tensors) -> torch.Tensor | None:
    """The (Dout, Dout) covariance of a bias (None: deterministic, or carried by the weight)."""
    if kind is None or kind == AFFINE_BIAS:
        return None
    return _structure(kind).dense(tensors)


def marginal_variance(kind: str, tensors: Tensors, shape: torch.Size | None = None) -> torch.Tensor:
    """The exact variance of every entry of a parameter, in its shape (KFAC / dense / low-rank -> diag)."""
    if kind == AFFINE_BIAS:
        joint = "param_dense_affine" if len(tensors) == 1 else "param_lowrank_affine"
        return _structure(joint).marginal(tensors).reshape(tensors[0].shape[0], -1)[:, -1]
    structure = _structure(kind)
    var = structure.marginal(tensors)
    if structure.affine:
        var = var.reshape(tensors[0].shape[0], -1)[:, :-1]
    return var.reshape(shape) if shape is not None else var

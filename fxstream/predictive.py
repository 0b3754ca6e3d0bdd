"""The predictive distribution one streamlined forward pass returns."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from .errors import FxstreamError

Likelihood = Literal["classification", "regression"]


@dataclass
class Predictive:
    """Mean and covariance of a network output under the weight (and input) posterior.

    ``mean`` has the output's shape, ``var`` is its per-element variance (same
    shape), and ``cov`` is the full covariance over the non-batch dimensions of
    each sample, shaped ``mean.shape + mean.shape[1:]``, when the pass tracked
    full activation covariance (else None).
    """

    mean: torch.Tensor
    var: torch.Tensor
    cov: torch.Tensor | None = None
    likelihood: Likelihood | None = None
    sigma_noise: float | None = None

    @property
    def std(self) -> torch.Tensor:
        """Per-element standard deviation of the output, sqrt(var)."""
        return self.var.clamp_min(0).sqrt()

    def __len__(self) -> int:
        return self.mean.shape[0]

    def __getitem__(self, index: Any) -> Predictive:
        """The predictive of some samples: ``index`` indexes the batch (first) dimension, as for a tensor."""
        return replace(self, mean=self.mean[index], var=self.var[index],
                       cov=None if self.cov is None else self.cov[index])

    def to(self, *args: Any, **kwargs: Any) -> Predictive:
        """A copy with every tensor moved as ``torch.Tensor.to(*args, **kwargs)`` moves it."""
        return replace(self, mean=self.mean.to(*args, **kwargs), var=self.var.to(*args, **kwargs),
                       cov=None if self.cov is None else self.cov.to(*args, **kwargs))

    def cpu(self) -> Predictive:
        return self.to("cpu")

    @staticmethod
    def cat(predictives: Sequence[Predictive]) -> Predictive:
        """One predictive over the batches of several (same likelihood, noise and covariance structure)."""
        if not predictives:
            raise FxstreamError("Predictive.cat needs at least one predictive")
        first = predictives[0]
        for other in predictives[1:]:
            if (other.likelihood, other.sigma_noise, other.cov is None) != (first.likelihood, first.sigma_noise,
                                                                           first.cov is None):
                raise FxstreamError(
                    "Predictive.cat joins predictives of one streamlined model: these differ in likelihood, "
                    "sigma_noise or whether they carry a full covariance"
                )
        return replace(first, mean=torch.cat([p.mean for p in predictives]),
                       var=torch.cat([p.var for p in predictives]),
                       cov=None if first.cov is None else torch.cat([p.cov for p in predictives]))

    def entropy(self, link: Literal["probit", "mc"] = "probit") -> torch.Tensor:
        """Entropy of the predictive class probabilities ``probs(link)``, one value per sample (nats)."""
        return _entropy(self.probs(link))

    def mutual_information(self, samples: int = 100, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """The epistemic part of the predictive entropy, one value per sample (nats).

        I = H[E_f softmax(f)] - E_f H[softmax(f)] over f ~ N(mean, cov) (the diagonal Gaussian
        without a full covariance), estimated from ``samples`` Gaussian logit draws, the same
        draws for both terms: no network passes, and >= 0 by the concavity of the entropy.
        """
        probs = torch.softmax(self.sample_outputs(samples, generator=generator), dim=-1)
        return (_entropy(probs.mean(0)) - _entropy(probs).mean(0)).clamp_min(0)

    def probs(
        self,
        link: Literal["probit", "mc"] = "probit",
        *,
        samples: int = 1000,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Class probabilities over the last dimension.

        ``"probit"`` scales each logit mean by (1 + pi/8 var)^-1/2 before the
        softmax and uses only the variances. ``"mc"`` samples logits from the
        Gaussian (the full covariance when there is one) and averages the
        softmax: no network passes, only cheap draws.
        """
        if link == "probit":
            kappa = torch.rsqrt(1.0 + math.pi / 8.0 * self.var)
            return torch.softmax(kappa * self.mean, dim=-1)
        if link == "mc":
            return torch.softmax(self.sample_outputs(samples, generator=generator), dim=-1).mean(0)
        raise FxstreamError(f"unknown link '{link}'; use 'probit' or 'mc'")

    def sample_outputs(self, samples: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw outputs f ~ N(mean, cov) (or the diagonal Gaussian), shaped (samples, *mean.shape)."""
        noise_shape = (samples, *self.mean.shape)
        if self.cov is None:
            eps = torch.randn(noise_shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
            return self.mean + eps * self.var.clamp_min(0).sqrt()
        batch = self.mean.shape[0]
        n = self.mean[0].numel()
        cov = self.cov.reshape(batch, n, n)
        jitter = 1e-10 * cov.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(1e-30)
        chol = torch.linalg.cholesky(cov + torch.diag_embed(jitter.expand(batch, n)))
        eps = torch.randn(samples, batch, n, 1, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + (chol @ eps).reshape(noise_shape)

    def predictive_var(self) -> torch.Tensor:
        """Variance of the observation y: output variance plus sigma_noise^2 (regression)."""
        noise = 0.0 if self.sigma_noise is None else float(self.sigma_noise) ** 2
        return self.var + noise

    def nlpd(self, y: torch.Tensor, *, link: Literal["probit", "mc"] = "probit") -> torch.Tensor:
        """Mean negative log predictive density of targets ``y``.

        Regression: Gaussian N(mean, var + sigma_noise^2). Classification: the
        categorical with ``probs(link)``.
        """
        if self.likelihood == "regression":
            var = self.predictive_var()
            y = y.reshape(self.mean.shape).to(self.mean.dtype)
            return (0.5 * (torch.log(2 * math.pi * var) + (y - self.mean) ** 2 / var)).mean()
        if self.likelihood == "classification":
            p = self.probs(link)
            picked = p.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
            return -torch.log(picked.clamp_min(torch.finfo(p.dtype).tiny)).mean()
        raise FxstreamError(
            "nlpd needs a likelihood: pass likelihood='classification' or 'regression' to streamline()"
        )


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dimension (0 log 0 = 0)."""
    return -torch.special.xlogy(probs, probs).sum(-1)

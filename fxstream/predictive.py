"""The predictive distribution one streamlined forward pass returns."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

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

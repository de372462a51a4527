"""The Gaussian diffusion of Ho et al. 2020 as one object: the schedule, what the network predicts, the loss
and its weighting. It owns the forward process (eq. 4), the reading of a network's output as (x0, eps), the
posterior q(x_{t-1} | x_t, x_0) (eq. 6-7) and the model's p(x_{t-1} | x_t) built from it, and the training
loss of Algorithm 1 as per-image terms. The samplers (sampling.py) are pure functions of a denoiser built
here; a conditioning input (class labels) rides along inside the denoiser, so a sampler never changes when
the network gains an input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.diffusion.distributions import discretized_gaussian_log_likelihood, mean_bits, normal_kl
from ddpm.diffusion.schedules import Schedule, build_schedule, extract
from ddpm.errors import ConfigError


class Loss(Enum):
    """The distance between the network's output and its target."""

    l1 = "l1"
    l2 = "l2"
    huber = "huber"  # smooth l1: quadratic below 1, linear above
    kl = "kl"  # no distance: the bound's own term T L_t (Ho et al.'s true variational bound)


class Objective(Enum):
    """What the network predicts: the noise (Ho et al.), the clean image, or v (Salimans & Ho 2022)."""

    eps = "eps"
    x0 = "x0"
    v = "v"


class Variance(Enum):
    """The variance of p(x_{t-1} | x_t) (Ho et al. sec. 3.2: both fixed ones give similar samples)."""

    auto = "auto"  # the model's own: its file's ddpm_variance where that names one, else learned for a
    # learn_sigma model and small otherwise
    small = "small"  # beta~_t, the posterior variance
    large = "large"  # beta_t
    learned = "learned"  # exp(frac log beta_t + (1 - frac) log beta~_t), frac from the network


class Prediction(NamedTuple):
    """What a denoiser reads from the network at (x_t, t): x0_hat and eps_hat, and for a learn_sigma model
    frac = (v + 1) / 2, where the log-variance lies between log beta~_t (0) and log beta_t (1)."""

    x0: torch.Tensor
    eps: torch.Tensor
    frac: torch.Tensor | None = None


# (x_t, t) -> Prediction: a network's output read through its objective, its conditioning bound.
Denoiser = Callable[[torch.Tensor, torch.Tensor], Prediction]

# The per-image terms of the training loss by name ("loss" is the one that is minimised), each (B,).
Terms = dict[str, torch.Tensor]


def elementwise_loss(loss: Loss, prediction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    if loss is Loss.l1:
        return F.l1_loss(prediction, truth, reduction="none")
    if loss is Loss.l2:
        return F.mse_loss(prediction, truth, reduction="none")
    if loss is Loss.huber:
        return F.smooth_l1_loss(prediction, truth, reduction="none")
    raise ValueError(f"unknown loss {loss!r}")


@dataclass(frozen=True)
class Diffusion:
    """A schedule and how a network is trained on it and read from it."""

    schedule: Schedule
    objective: Objective = Objective.eps
    loss: Loss = Loss.l2
    min_snr_gamma: float = 0.0  # Min-SNR-gamma weighting (Hang et al. 2023); 0: off
    offset_noise: float = 0.0  # eps gets offset_noise * N(0, 1) per image and channel on top; 0: off
    learn_sigma: bool = False  # the network's 2C outputs: the objective's, then v of the variance
    vlb_weight: float = 0.001  # lambda of L_simple + lambda L_vlb (Nichol & Dhariwal eq. 16)
    bound_variance: Variance = Variance.small  # loss=kl: the variance whose bound is trained on
    sampling_variance: Variance = Variance.auto  # what ddpm_variance=auto means for this model

    @classmethod
    def from_config(cls, cfg: Any) -> Diffusion:
        """From a training config (composed, or a checkpoint's plain values): its schedule group and
        timesteps, objective, loss, min_snr_gamma, offset_noise, learn_sigma and vlb_weight, and for loss=kl
        ddpm_variance (keys an older file lacks default)."""
        get = cfg.get
        learn_sigma, loss = bool(get("learn_sigma", False)), Loss[_name(get("loss", "l2"))]
        variance = _name(get("ddpm_variance", "auto")) if loss is Loss.kl else "small"
        return cls(
            build_schedule(cfg.schedule, cfg.timesteps),
            Objective[_name(get("objective", "eps"))],
            loss,
            float(get("min_snr_gamma", 0.0)),
            float(get("offset_noise", 0.0)),
            learn_sigma,
            float(get("vlb_weight", 0.001)),
            resolve_variance(variance, learn_sigma),
            Variance(_name(get("ddpm_variance", "auto"))),
        )

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def to(self, device: torch.device | str) -> Diffusion:
        return replace(self, schedule=self.schedule.to(device))

    def _scales(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) shaped to broadcast against ``ndim``-dimensional images."""
        s = self.schedule
        return extract(s.sqrt_alphas_cumprod, t, ndim), extract(s.sqrt_one_minus_alphas_cumprod, t, ndim)

    # ------------------------------------------------------------------------------ the forward process
    def noise(self, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """eps ~ N(0, I), plus offset_noise times one N(0, 1) draw per image and channel (offset noise),
        which lets the model change an image's mean brightness."""
        eps = torch.randn(shape, generator=generator, device=device)
        if self.offset_noise > 0:
            eps = eps + self.offset_noise * torch.randn(*shape[:2], 1, 1, generator=generator, device=device)
        return eps

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a sample of q(x_t | x_0) in closed form."""
        a, s = self._scales(t, x0.ndim)
        return a * x0 + s * noise

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0), eq. 7: mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t)
        x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t, variance beta~_t (0 at t = 0)."""
        s, n = self.schedule, x_t.ndim
        mean = extract(s.posterior_mean_coef_x0, t, n) * x0 + extract(s.posterior_mean_coef_xt, t, n) * x_t
        return mean, extract(s.posterior_variance, t, n)

    # ------------------------------------------------------------------------ what the network predicts
    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: eps, x_0, or v = sqrt(abar) eps - sqrt(1 - abar) x_0
        (Salimans & Ho 2022)."""
        if self.objective is Objective.eps:
            return noise
        if self.objective is Objective.x0:
            return x0
        a, s = self._scales(t, x0.ndim)
        return a * noise - s * x0

    def predict_x0_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Invert x_t = a x_0 + s eps for the pair (x_0, eps), given the network's output ``out``."""
        a, s = self._scales(t, x_t.ndim)
        if self.objective is Objective.eps:
            return (x_t - s * out) / a, out
        if self.objective is Objective.x0:
            return out, (x_t - a * out) / s
        return a * x_t - s * out, s * x_t + a * out  # v: a^2 + s^2 = 1

    def denoiser(
        self,
        model: nn.Module,
        clip_x0: bool,
        labels: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        null_label: int | None = None,
    ) -> Denoiser:
        """The network as a function (x_t, t) -> (x0_hat, eps_hat), given ``labels`` where it is
        conditional, with classifier-free guidance where ``guidance_scale`` is not 1 (guided_output). With
        ``clip_x0``, x0_hat is clipped to the data range [-1, 1] and eps_hat recomputed from it, so both
        stay consistent with x_t."""
        output = guided_output(model, labels, guidance_scale, null_label, self.learn_sigma)

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
            out, v = self.split_output(output(x_t, t))
            x0, eps = self.predict_x0_eps(x_t, t, out)
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
                a, s = self._scales(t, x_t.ndim)
                eps = (x_t - a * x0) / s  # s = sqrt(1 - abar_t) > 0 at every t
            return Prediction(x0, eps, None if v is None else (v + 1) / 2)

        return denoise

    def split_output(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The network's output as (the objective's C channels, v's C channels or None)."""
        if not self.learn_sigma:
            return out, None
        mean_out, v = out.chunk(2, dim=1)
        return mean_out, v

    def resolve_variance(self, variance: Variance | str) -> Variance:
        return resolve_variance(variance, self.learn_sigma, self.sampling_variance)

    def p_mean_variance(
        self, denoise: Denoiser, x_t: torch.Tensor, t: torch.Tensor, variance: Variance
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p(x_{t-1} | x_t): the posterior mean at the model's x0_hat, the variance that ``variance``
        names (beta~_t; beta_t with beta~_1 at t = 0; or the learned one), and x0_hat."""
        variance = self.resolve_variance(variance)
        pred = denoise(x_t, t)
        mean, posterior_var = self.q_posterior_mean_variance(pred.x0, x_t, t)
        if variance is Variance.small:
            return mean, posterior_var, pred.x0
        if variance is Variance.large:
            return mean, extract(self.schedule.large_variance, t, x_t.ndim), pred.x0
        return mean, self.model_log_variance(t, variance, x_t.ndim, pred.frac).exp(), pred.x0

    def model_log_variance(
        self, t: torch.Tensor, variance: Variance, ndim: int, frac: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log of p(x_{t-1} | x_t)'s variance for the likelihood, where the decoder at t = 0 needs one above
        0: log beta~_t or log beta_t, each with beta~_1 at t = 0; or learned, frac log beta_t + (1 - frac)
        log beta~_t (beta~ clipped likewise; improved-diffusion's LEARNED_RANGE)."""
        s = self.schedule
        if variance is Variance.learned:
            if frac is None:
                raise ValueError("the learned variance needs the network's frac (a learn_sigma model)")
            top, bottom = extract(s.log_betas, t, ndim), extract(s.posterior_log_variance_clipped, t, ndim)
            return frac * top + (1 - frac) * bottom
        log_var = s.posterior_log_variance_clipped if variance is Variance.small else s.large_log_variance
        return extract(log_var, t, ndim)

    def vb_terms_bpd(
        self, denoise: Denoiser, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, variance: Variance
    ) -> torch.Tensor:
        """The bound's term at t of each image, in bits/dim: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
        for t > 0, the decoder's -log p(x_0 | x_1) under the discretized Gaussian at t = 0 (``t`` is the
        0-based index, so t = 0 is Ho et al.'s t = 1)."""
        pred = denoise(x_t, t)
        true_mean, _ = self.q_posterior_mean_variance(x0, x_t, t)
        true_logvar = extract(self.schedule.posterior_log_variance_clipped, t, x0.ndim)
        mean, _ = self.q_posterior_mean_variance(pred.x0, x_t, t)
        logvar = self.model_log_variance(t, variance, x0.ndim, pred.frac)
        kl = mean_bits(normal_kl(true_mean, true_logvar, mean, logvar))
        decoder = -mean_bits(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar))
        return torch.where(t == 0, decoder, kl)

    # ------------------------------------------------------------------------------- the training loss
    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weighting (Hang et al. 2023), expressed for each objective's own loss:
        min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x_0, min(SNR, gamma) / (SNR + 1) for v."""
        abar = self.schedule.alphas_cumprod[t]
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.objective is Objective.eps:
            return clipped / snr
        if self.objective is Objective.x0:
            return clipped
        return clipped / (snr + 1)

    def training_losses(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> Terms:
        """Algorithm 1's objective for each image: noise x_0 to x_t, ask the network for its target, compare
        with the truth, mean over the pixels; with min_snr_gamma > 0 weighted by the image's SNR. A
        learn_sigma model adds vlb_weight T L_t (the hybrid loss). Terms by name, each (B,): "loss" is what
        the step minimises; a learn_sigma model's also "loss_simple" and "loss_vlb" (L_t in bits/dim)."""
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t, labels)
        if self.loss is Loss.kl:
            # the bound itself, L_vlb = sum_t L_t estimated as T L_t, training the mean (and a learn_sigma
            # model's variance) through it: improved-diffusion's RESCALED_KL, Ho et al.'s true bound
            denoise = self.denoiser(lambda *_: output, clip_x0=False)
            return {"loss": self.timesteps * self.vb_terms_bpd(denoise, x0, x_t, t, self.bound_variance)}
        out, v = self.split_output(output)
        per_pixel = elementwise_loss(self.loss, out, self.target(x0, t, noise))
        per_image = per_pixel.flatten(1).mean(dim=1)
        if self.min_snr_gamma > 0:
            per_image = per_image * self.snr_weight(t)
        if v is None:
            return {"loss": per_image}
        # L_vlb = sum_t L_t, estimated as T L_t at the step's t; the mean is detached, so that it trains the
        # variance alone and L_simple keeps the mean (Nichol & Dhariwal sec. 3.1)
        frozen = torch.cat([out.detach(), v], dim=1)
        denoise = self.denoiser(lambda *_: frozen, clip_x0=False)
        vlb = self.vb_terms_bpd(denoise, x0, x_t, t, Variance.learned)
        loss = per_image + self.vlb_weight * self.timesteps * vlb
        return {"loss": loss, "loss_simple": per_image, "loss_vlb": vlb}


def resolve_variance(
    variance: Variance | str, learn_sigma: bool, default: Variance | str = Variance.auto
) -> Variance:
    """ddpm_variance for a model: auto is the model's ``default`` (its file's ddpm_variance) where that
    names one, else learned for a learn_sigma model and small otherwise; learned needs the network's v,
    so a fixed-variance model refuses it."""
    variance = Variance(variance)
    if variance is Variance.auto:
        variance = Variance(default)
    if variance is Variance.auto:
        return Variance.learned if learn_sigma else Variance.small
    if variance is Variance.learned and not learn_sigma:
        raise ConfigError(
            "ddpm_variance=learned needs a model trained with learn_sigma=true; this one has fixed "
            "variances: choose ddpm_variance=auto, small or large"
        )
    return variance


def guided_output(
    model: nn.Module,
    labels: torch.Tensor | None,
    scale: float,
    null_label: int | None,
    learn_sigma: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x_t, t) -> the network's output under classifier-free guidance (Ho & Salimans 2021):
    out = out_uncond + s (out_cond - out_uncond), on whatever the objective predicts (eps, x0 and v are
    affine in each other at a fixed x_t, so guiding any of them guides the others alike). The two halves
    come from one forward pass over 2B images. s = 1 is the conditional model alone and s = 0 the null
    label alone, each one B-sized pass. With ``learn_sigma`` only the objective's channels are guided; the
    variance's come from the conditional half."""
    if labels is None or scale == 1:
        return lambda x_t, t: model(x_t, t, labels)
    if null_label is None:
        raise ValueError("guidance needs the null label of the model")
    null = torch.full_like(labels, null_label)
    if scale == 0:
        return lambda x_t, t: model(x_t, t, null)
    both_labels = torch.cat([labels, null])

    def output(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]), both_labels).chunk(2)
        if not learn_sigma:
            return uncond + scale * (cond - uncond)
        (cond_out, cond_v), (uncond_out, _) = cond.chunk(2, dim=1), uncond.chunk(2, dim=1)
        return torch.cat([uncond_out + scale * (cond_out - uncond_out), cond_v], dim=1)

    return output


def _name(value: Any) -> str:
    """An enum's name, whether the config holds the enum (composed) or its name (a checkpoint's)."""
    return value.name if isinstance(value, Enum) else str(value)

"""Samplers against exact denoisers: for Gaussian data E[x_0 | x_t] is known in closed form, so each
sampler must reproduce the data distribution up to its discretisation error."""

from contextlib import contextmanager

import pytest
import torch

from ddpm.diffusion.gaussian import Diffusion, Objective
from ddpm.diffusion.generate import frame_steps, generate, generate_with_frames
from ddpm.diffusion.sampling import (
    SamplingOptions,
    Spacing,
    ddim_sample,
    dpm_solver_pp_sample,
    p_sample_loop,
    sampling_timesteps,
)
from ddpm.diffusion.schedules import Schedule, cosine_betas, linear_betas, rescale_zero_terminal_snr

MU, SD = 0.1, 0.25


class GaussianOracle(torch.nn.Module):
    """The exact eps-prediction for data ~ N(MU, SD^2) per pixel: with x_t = a x_0 + s eps,
    E[x_0 | x_t] = MU + a SD^2 / (a^2 SD^2 + s^2) (x_t - a MU) and eps = (x_t - a E[x_0 | x_t]) / s."""

    def __init__(self, schedule: Schedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.calls = 0

    def forward(self, x_t, t, labels=None):
        self.calls += 1
        a = self.schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s = self.schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = MU + a * SD**2 / (a**2 * SD**2 + s**2) * (x_t - a * MU)
        return (x_t - a * x0) / s


@pytest.fixture
def schedule():
    return Schedule.from_betas(linear_betas(1000, 1e-4, 0.02))


def moments(sampler, schedule, steps, **options):
    oracle = GaussianOracle(schedule)
    denoise = Diffusion(schedule, Objective.eps).denoiser(oracle, clip_x0=False)
    ts = sampling_timesteps(schedule.timesteps, steps, Spacing.linspace)
    g = torch.Generator().manual_seed(0)
    x = sampler(denoise, schedule, torch.randn(40000, 1, 1, 1, generator=g), ts, g, **options)
    assert oracle.calls == len(ts)
    return x.mean().item(), x.std().item()


@pytest.mark.parametrize(
    ("sampler", "steps", "options", "tolerance"),
    [
        (p_sample_loop, 1000, {"variance": "small"}, 0.02),
        # fixed-large variance adds a little spread by design (Ho et al. sec. 3.2)
        (p_sample_loop, 1000, {"variance": "large"}, 0.05),
        (ddim_sample, 1000, {"eta": 1.0}, 0.02),
        (ddim_sample, 400, {"eta": 0.0}, 0.02),
        (dpm_solver_pp_sample, 400, {}, 0.01),
    ],
)
def test_samplers_recover_the_data_distribution(schedule, sampler, steps, options, tolerance):
    mean, std = moments(sampler, schedule, steps, **options)
    assert mean == pytest.approx(MU, abs=0.01)
    assert std == pytest.approx(SD, rel=tolerance)


def test_ddim_converges_at_first_order_and_dpm_solver_at_second():
    # Error of the sample spread at 100 and at 400 steps: a method of order p shrinks it ~4^p times.
    schedule = Schedule.from_betas(linear_betas(1000, 1e-4, 0.02))

    def ratio(sampler, **options):
        e100, e400 = (abs(moments(sampler, schedule, n, **options)[1] - SD) for n in (100, 400))
        return e100 / e400

    assert 3 < ratio(ddim_sample, eta=0.0) < 5.5
    assert ratio(dpm_solver_pp_sample) > 8


@pytest.mark.parametrize("sampler", [ddim_sample, dpm_solver_pp_sample])
def test_deterministic_samplers_ignore_the_generator(schedule, sampler):
    denoise = Diffusion(schedule, Objective.eps).denoiser(GaussianOracle(schedule), clip_x0=True)
    ts = sampling_timesteps(1000, 10, Spacing.trailing)
    x_T = torch.randn(8, 1, 2, 2)
    a = sampler(denoise, schedule, x_T, ts, torch.Generator().manual_seed(1))
    b = sampler(denoise, schedule, x_T, ts, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sampler", [p_sample_loop, ddim_sample, dpm_solver_pp_sample])
def test_zero_terminal_snr_schedule_samples_with_v_prediction(sampler):
    # abar_T = 0: eps-prediction is undefined at T, v-prediction is not.
    schedule = Schedule.from_betas(rescale_zero_terminal_snr(cosine_betas(200, 0.008, 0.999)))

    def v_model(x_t, t, labels=None):  # v = a eps - s x_0, from the exact x_0 (no division by a = 0 at T)
        a = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = MU + a * SD**2 / (a**2 * SD**2 + s**2) * (x_t - a * MU)
        return a * (x_t - a * x0) / s - s * x0

    denoise = Diffusion(schedule, Objective.v).denoiser(v_model, clip_x0=False)
    ts = sampling_timesteps(200, 200, Spacing.trailing)
    x = sampler(
        denoise, schedule, torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0)), ts
    )
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(SD, rel=0.05)


def test_timestep_spacings():
    assert sampling_timesteps(1000, 10, Spacing.linspace) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert sampling_timesteps(1000, 10, Spacing.leading) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert sampling_timesteps(1000, 10, Spacing.trailing) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    for spacing in Spacing:
        assert sampling_timesteps(50, 50, spacing) == list(range(49, -1, -1))
        assert len(sampling_timesteps(1000, 37, spacing)) == 37
        assert sampling_timesteps(1000, 1, spacing)[0] in (0, 999)


@pytest.mark.parametrize("spacing", list(Spacing))
@pytest.mark.parametrize("timesteps", [50, 200, 1000])
def test_every_count_of_steps_gives_that_many_distinct_timesteps(timesteps, spacing):
    for n in range(1, timesteps + 1):
        ts = sampling_timesteps(timesteps, n, spacing)
        assert len(ts) == n and len(set(ts)) == n, (n, ts)
        assert ts == sorted(ts, reverse=True) and ts[-1] >= 0 and ts[0] <= timesteps - 1, (n, ts)
        if spacing is Spacing.trailing:
            assert ts[0] == timesteps - 1


def test_trailing_counts_that_a_float_range_overshot():
    # arange(200, 0, -200 / 29) holds 30 values, the last of which rounds to 0 and so became t = -1
    assert sampling_timesteps(200, 29, Spacing.trailing)[-1] == 6
    assert sampling_timesteps(1000, 61, Spacing.trailing)[-1] == 15


@pytest.mark.parametrize(
    ("sampler", "options"),
    [(p_sample_loop, {"variance": "small"}), (ddim_sample, {"eta": 0.5}), (dpm_solver_pp_sample, {})],
)
def test_on_step_sees_every_state_and_changes_nothing(schedule, sampler, options):
    denoise = Diffusion(schedule, Objective.eps).denoiser(GaussianOracle(schedule), clip_x0=True)
    ts = sampling_timesteps(1000, 12, Spacing.linspace)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    seen = []
    plain = sampler(denoise, schedule, x_T, ts, torch.Generator().manual_seed(1), **options)
    watched = sampler(
        denoise,
        schedule,
        x_T,
        ts,
        torch.Generator().manual_seed(1),
        **options,
        on_step=lambda i, x: seen.append((i, x.clone())),
    )
    assert torch.equal(plain, watched)
    assert [i for i, _ in seen] == list(range(1, len(ts) + 1))
    assert torch.equal(seen[-1][1].clamp(-1, 1), plain)


def test_sample_steps_are_at_most_t():
    assert SamplingOptions().sample_steps == 100  # configs/sampling/default.yaml's default
    assert SamplingOptions(sample_steps=50).steps(200) == 50
    assert SamplingOptions(sample_steps=50).steps(20) == 20  # a short schedule: all of it
    assert SamplingOptions(sample_steps=None).steps(1000) == 1000


# What reads a tensor's value back to the host, and so waits for the device to get there.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__array__", "__bool__", "__float__", "__int__", "__index__")


class HostRead(AssertionError):
    pass


def refuse(name):
    def read(*args, **kwargs):
        raise HostRead(f"Tensor.{name} inside the sampling loop waits for the device")

    return read


@contextmanager
def no_host_reads_after_the_first_call(denoise, device):
    """The denoiser, which from its first call on (the tables are built by then, before the loop) makes
    every host read of a tensor raise, and on CUDA every synchronising call; both undone on leaving."""
    calls = []
    with pytest.MonkeyPatch.context() as patches:

        def armed(x, t):
            if not calls:
                for name in HOST_READS:
                    patches.setattr(torch.Tensor, name, refuse(name))
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("error")
            calls.append(t)
            return denoise(x, t)

        try:
            yield armed, calls
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
@pytest.mark.parametrize(
    ("sampler", "options"),
    [(p_sample_loop, {"variance": "small"}), (ddim_sample, {"eta": 0.5}), (dpm_solver_pp_sample, {})],
)
def test_sampling_loops_never_wait_for_the_device(sampler, options, device):
    from conftest import FIXTURES

    from ddpm.trained import load_trained

    device = torch.device(device)
    trained = load_trained(FIXTURES / "tiny_v2.pt", device)
    ts = sampling_timesteps(trained.diffusion.timesteps, 8, Spacing.linspace)
    x_T = torch.randn((3, *trained.shape), device=device)
    with no_host_reads_after_the_first_call(trained.denoiser(clip_x0=True), device) as (denoise, calls):
        x = sampler(
            denoise, trained.diffusion.schedule, x_T, ts, torch.Generator(device).manual_seed(0), **options
        )
        with pytest.raises(HostRead):  # the guard is armed: a read in the loop would have failed the same
            bool(x.sum() > 0)
    assert len(calls) == len(ts)
    assert x.shape == x_T.shape and torch.isfinite(x).all()


def test_frame_steps_span_noise_to_images_evenly():
    assert frame_steps(200, 5) == [0, 50, 100, 150, 200]
    assert frame_steps(10, 40) == list(range(11))  # at most one frame per step
    assert frame_steps(1, 2) == [0, 1]
    for steps in (1, 7, 50, 200):
        for frames in range(2, steps + 2):
            chosen = frame_steps(steps, frames)
            assert len(chosen) == frames and chosen[0] == 0 and chosen[-1] == steps


def test_frames_run_from_x_T_to_the_same_images_generate_draws():
    from conftest import FIXTURES

    from ddpm.trained import load_trained

    trained = load_trained(FIXTURES / "tiny_v2.pt", torch.device("cpu"))
    sampling = SamplingOptions(sampler="ddim", sample_steps=10, eta=1.0)
    images = generate(trained, sampling, 5, 3, 2)  # three batches: 2 + 2 + 1
    same, frames = generate_with_frames(trained, sampling, 5, 3, 2, frames=4)
    assert torch.equal(images, same)
    assert frames.shape == (4, 5, *trained.shape)
    assert torch.equal(frames[-1], images)
    g = torch.Generator().manual_seed(3)  # generate's x_T: the first draws of the seeded generator
    assert torch.equal(frames[0, :2], torch.randn((2, *trained.shape), generator=g).clamp(-1, 1))


def test_generate_gives_each_image_its_label_batch_by_batch():
    from ddpm.diffusion.gaussian import Diffusion
    from ddpm.diffusion.schedules import Schedule
    from ddpm.trained import TrainedModel

    class LabelEcho(torch.nn.Module):
        """Predicts eps = the image's label everywhere, and records the labels of each call."""

        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x, t, labels=None):
            self.seen.append(labels.clone())
            return labels.float().view(-1, 1, 1, 1).expand_as(x)

    network = LabelEcho()
    diffusion = Diffusion(Schedule.from_betas(torch.linspace(1e-4, 0.02, 10)))
    trained = TrainedModel(network, diffusion, (1, 2, 2), ("a", "b", "c"))
    labels = torch.tensor([2, 0, 1, 1, 2])
    sampling = SamplingOptions(sampler="ddim", sample_steps=2)
    generate(trained, sampling, 5, 0, 2, labels=labels)  # batches of 2 + 2 + 1, two steps each
    assert [s.tolist() for s in network.seen] == [[2, 0], [2, 0], [1, 1], [1, 1], [2], [2]]
    with pytest.raises(ValueError, match="5 images need 5 labels"):
        generate(trained, sampling, 5, 0, 2, labels=labels[:4])

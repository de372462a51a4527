"""diffusers pipelines in and out, checked against diffusers itself (UNet2DModel, DDPMScheduler,
DDPMPipeline), offline: the folders are random-weight models of the published layouts, saved with
save_pretrained (the new names and safetensors) or written by hand (an older .bin with the old names)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, Exploit, assert_refused, run_entry

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from ddpm import cli  # noqa: E402
from ddpm.diffusion.gaussian import Diffusion, Variance  # noqa: E402
from ddpm.diffusion.schedules import Schedule, build_schedule  # noqa: E402
from ddpm.interop.scheduler import scheduler_from_run  # noqa: E402
from ddpm.models.unet_ho import HoUNet  # noqa: E402
from ddpm.trained import load_trained  # noqa: E402

CPU = torch.device("cpu")
# a tiny ho2020 run for the tests that train one (each adds its steps, T and settings)
HO_RUN = [
    "model=ho2020",
    "model.dim=32",
    "model.dim_mults=[1,2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[4]",
    "sample_every=0",
    "forward_n=0",
    "sample_n=4",
    "device=cpu",
    "precision=fp32",
]
ATOL = 1e-5  # fp32: the two networks add the same products in other orders

# google/ddpm-cifar10-32's unet/config.json (the keys a current diffusers reads)
CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    norm_eps=1e-6,
    norm_num_groups=32,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    act_fn="silu",
    center_input_sample=False,
    time_embedding_type="positional",
    mid_block_scale_factor=1,
)
# google/ddpm-church-256 (and celebahq, bedroom, cat): ch_mult (1, 1, 2, 2, 4, 4), attention at 16x16
LSUN256 = {
    **CIFAR10,
    "sample_size": 256,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
}
# the same layout at a size the suite can afford: widths / 4, 64x64 (attention at 4x4, the same level)
LSUN256_SMALL = {**LSUN256, "sample_size": 64, "block_out_channels": (32, 32, 64, 64, 128, 128)}
# the family at 8x8 in two levels, for the tests that run the commands on a folder
TINY8 = {
    **CIFAR10,
    "sample_size": 8,
    "block_out_channels": (32, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}


def random_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """A UNet2DModel with every weight random (its own init leaves some at zero, which hides mistakes)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 1 / math.sqrt(max(1, p[0].numel())))
    return unet


def save_pipeline(unet: UNet2DModel, folder: Path, **scheduler) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler)).save_pretrained(folder)
    return folder


def same_output(ours: torch.nn.Module, theirs: UNet2DModel, size: int, channels: int = 3, **kw) -> float:
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 731])
    with torch.no_grad():
        return (ours(x, t, kw.get("labels")) - theirs(x, t, class_labels=kw.get("labels")).sample).abs().max()


# -------------------------------------------------------------------------------- Ho et al.'s network
def formula_weights(model: torch.nn.Module) -> None:
    """Weights from a formula, not an RNG: the same on every machine and torch version (the fixture's)."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.state_dict().items())):
            k = torch.arange(p.numel(), dtype=torch.float64)
            scale = math.sqrt(max(1, p.numel() // p.shape[0]))
            p.copy_((torch.sin(k * 0.7 + i) / scale).reshape(p.shape).float())


def test_legacy_variant_computes_what_ho2020_computed_before_the_variants():
    # the fixture is the output of ddpm's ho2020 before model.variant existed, for these weights
    old = torch.load(FIXTURES / "ho2020_legacy_output.pt", weights_only=True)
    net = HoUNet(1, 8, 32, (1, 2), 1, (4,), 0.0, variant="legacy").eval()
    formula_weights(net)
    with torch.no_grad():
        out = net(old["x"], old["t"])
    assert torch.allclose(out, old["out"], atol=ATOL, rtol=0)
    original = HoUNet(1, 8, 32, (1, 2), 1, (4,), 0.0, variant="original").eval()
    original.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert (original(old["x"], old["t"]) - old["out"]).abs().max() > 1e-3


def test_variants_build_their_layers():
    for variant, eps, padding in (("original", 1e-6, 0), ("legacy", 1e-5, 1)):
        net = HoUNet(3, 16, 32, (1, 2), 1, (8,), 0.0, variant=variant)
        norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(m.eps == eps for m in norms)
        assert net.downsample[0].padding == (padding, padding)
        x = torch.zeros(1, 32, 16, 16)
        x[..., -1, -1] = 1  # only the bottom-right pixel: "SAME" pads after it, symmetric padding before too
        assert net.downsample[0](x).shape == (1, 32, 8, 8)


def test_an_old_checkpoint_is_the_legacy_variant_and_samples_the_same_bytes(tmp_path, in_process):
    args = [*HO_RUN, "steps=2", "timesteps=10"]
    r = in_process(
        "ddpm-train", *args, "model.variant=legacy", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    payload = torch.load(ckpt, weights_only=True)
    del payload["config"]["model"]["variant"]  # as ho2020 checkpoints were written before the key
    torch.save(payload, tmp_path / "old.pt")
    payload["config"]["model"]["variant"] = "original"
    torch.save(payload, tmp_path / "original.pt")
    grids = {}
    for name in ("run/checkpoints/last.pt", "old.pt", "original.pt"):
        out = tmp_path / "out" / Path(name).stem / name.split("/")[0]
        r = in_process(
            "ddpm-sample", f"ckpt={tmp_path / name}", "n=4", "device=cpu", f"out={out}", cwd=tmp_path
        )
        assert r.returncode == 0, r.stderr
        grids[name] = (out / "grid.png").read_bytes()
    assert grids["old.pt"] == grids["run/checkpoints/last.pt"]
    assert grids["original.pt"] != grids["old.pt"]
    assert load_trained(tmp_path / "old.pt", CPU).network.variant == "legacy"


def test_resuming_an_old_ho2020_run_keeps_the_legacy_variant(compose_cfg):
    from ddpm.training.rundir.plan import plain_config, resumed_config

    overrides = ["model=ho2020", "data=cifar10"]
    saved = plain_config(compose_cfg("train", overrides))
    del saved["model"]["variant"]
    assert resumed_config(compose_cfg("train", overrides), saved, overrides).model.variant == "legacy"
    with pytest.raises(Exception, match="model.variant=original differs from the resumed run's"):
        resumed_config(
            compose_cfg("train", [*overrides, "model.variant=original"]),
            saved,
            [*overrides, "model.variant=original"],
        )


@pytest.mark.parametrize(("preset", "layout"), [("ho2020", CIFAR10), ("ho2020_256", LSUN256)])
def test_presets_build_the_layout_of_the_published_models(compose_cfg, preset, layout):
    from ddpm.interop.unet2d import unet2d_from_ho

    size = layout["sample_size"]
    cfg = compose_cfg(
        "train", [f"model={preset}", "data=folder", f"data.image_size={size}", "data.channels=3"]
    )
    from omegaconf import OmegaConf

    ours = unet2d_from_ho(OmegaConf.to_container(cfg.model), 3, size, 3, None)
    for key, value in layout.items():
        assert ours[key] == (list(value) if isinstance(value, tuple) else value), key


# ------------------------------------------------------------------------------ reading a pipeline
@pytest.mark.parametrize(("layout", "size"), [(CIFAR10, 32), (LSUN256_SMALL, 64)])
def test_a_pipeline_loads_and_computes_what_unet2dmodel_computes(tmp_path, layout, size):
    unet = random_unet(layout)
    folder = save_pipeline(unet, tmp_path / "pipe", variance_type="fixed_large", clip_sample=True)
    trained = load_trained(folder, CPU)
    assert trained.network.variant == "original" and trained.source == "diffusers"
    assert same_output(trained.network, unet, size) < ATOL
    assert (
        trained.diffusion.timesteps == 1000 and trained.diffusion.resolve_variance("auto") is Variance.large
    )
    expected = DDPMScheduler().betas
    assert torch.allclose(trained.diffusion.schedule.betas, expected, rtol=1e-6)


def old_format_folder(unet: UNet2DModel, folder: Path) -> Path:
    """What diffusers' first releases wrote: a .bin of the old attention names and a config.json without
    the newer keys."""
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, tensor in unet.state_dict().items():
        for new, old in renames.items():
            name = name.replace(f".{new}.", f".{old}.")
        state[name] = tensor
    torch.save(state, folder / "unet" / "diffusion_pytorch_model.bin")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in CIFAR10.items()}
    config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", **config}
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    scheduler = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": "0.1.1",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "clip_sample": True,
        "num_train_timesteps": 1000,
        "trained_betas": None,
        "variance_type": "fixed_large",
    }
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": "0.1.1",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_an_old_format_pipeline_with_the_old_attention_names_loads(tmp_path):
    unet = random_unet(CIFAR10)
    trained = load_trained(old_format_folder(unet, tmp_path / "old"), CPU)
    assert same_output(trained.network, unet, 32) < ATOL


def test_a_conditional_learned_variance_pipeline(tmp_path):
    layout = {**CIFAR10, "block_out_channels": (32, 64, 64, 64), "out_channels": 6, "num_class_embeds": 5}
    unet = random_unet(layout)
    folder = save_pipeline(unet, tmp_path / "pipe", variance_type="learned_range", clip_sample=False)
    trained = load_trained(folder, CPU)
    assert trained.diffusion.learn_sigma and trained.class_names == ("0", "1", "2", "3", "4")
    assert trained.default_clip is False and not trained.null_trained  # guidance needs a null label
    assert same_output(trained.network, unet, 32, labels=torch.tensor([0, 4])) < ATOL


# ----------------------------------------------------------------------------- writing a pipeline
@pytest.fixture(scope="module")
def ho_run(tmp_path_factory) -> Path:
    """A tiny ho2020 run, class-conditional, with learned variances and a cosine schedule."""
    from conftest import compose

    from ddpm.training.loop import train

    run = tmp_path_factory.mktemp("ho") / "run"
    args = [*HO_RUN, "steps=2", "timesteps=20", "class_cond=true", "learn_sigma=true", "schedule=cosine"]
    args.append("model.dropout=0.0")
    train(compose("train", args), run)
    return run / "checkpoints" / "last.pt"


def test_an_export_loads_in_diffusers_and_computes_what_ddpm_computes(ho_run, tmp_path, capsys):
    out = tmp_path / "exported"
    code, lines, output = run_entry(
        cli.export_main, [f"ckpt={ho_run}", "format=diffusers", f"out={out}"], capsys
    )
    assert code == 0, output
    assert "DDPMPipeline passes no labels" in output and "10 the null label" in output
    pipe = DDPMPipeline.from_pretrained(out)
    trained = load_trained(ho_run, CPU)
    assert same_output(trained.network, pipe.unet, 8, channels=1, labels=torch.tensor([3, 10])) < ATOL
    config = pipe.scheduler.config
    assert config.beta_schedule == "squaredcos_cap_v2" and config.variance_type == "learned_range"
    assert config.num_train_timesteps == 20 and pipe.unet.config.num_class_embeds == 11
    assert torch.allclose(pipe.scheduler.betas, trained.diffusion.schedule.betas, rtol=1e-5)
    again = load_trained(out, CPU)  # and back: the run it came from, from its ddpm.json
    assert again.class_names == trained.class_names and again.data == trained.data
    assert same_output(again.network, pipe.unet, 8, channels=1, labels=torch.tensor([1, 2])) < ATOL


def test_an_export_samples_in_ddpm_pipeline(tmp_path, in_process):
    args = [*HO_RUN, "steps=1", "timesteps=10", "model.variant=legacy"]
    assert in_process("ddpm-train", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path).returncode == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    r = in_process("ddpm-export", f"ckpt={ckpt}", "format=diffusers", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "run" / "checkpoints" / "last_diffusers"  # the default out
    pipe = DDPMPipeline.from_pretrained(folder)
    assert pipe.unet.config.downsample_padding == 1 and pipe.unet.config.norm_eps == 1e-5  # legacy, faithful
    assert same_output(load_trained(ckpt, CPU).network, pipe.unet, 8, channels=1) < ATOL
    images = pipe(batch_size=2, num_inference_steps=10, output_type="np").images
    assert images.shape == (2, 8, 8, 1)


@pytest.mark.parametrize(
    ("schedule", "named"),
    [
        ({"name": "linear", "beta_start": 1e-4, "beta_end": 0.02}, "linear"),
        ({"name": "quadratic", "beta_start": 1e-4, "beta_end": 0.02}, "scaled_linear"),
        ({"name": "sigmoid", "beta_start": 1e-4, "beta_end": 0.02, "start": -6.0, "end": 6.0}, "sigmoid"),
        ({"name": "cosine", "s": 0.008, "max_beta": 0.999}, "squaredcos_cap_v2"),
        ({"name": "cosine", "s": 0.02, "max_beta": 0.999}, None),  # not diffusers': as trained_betas
        ({"name": "sigmoid", "beta_start": 1e-4, "beta_end": 0.02, "start": -3.0, "end": 3.0}, None),
    ],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_exported_schedules_are_diffusers_betas(schedule, named, zero_snr):
    from omegaconf import OmegaConf

    from ddpm.interop.scheduler import run_keys_from_scheduler

    schedule = {**schedule, "zero_terminal_snr": zero_snr}
    config = scheduler_from_run({"schedule": schedule, "timesteps": 300, "objective": "v"})
    named = None if zero_snr else named  # diffusers rescales in float32: zero-SNR betas travel as betas
    assert config["beta_schedule"] == (named or "linear") and (config["trained_betas"] is None) == bool(named)
    theirs = DDPMScheduler.from_config(config)
    ours = build_schedule(OmegaConf.create(schedule), 300).betas
    assert torch.allclose(theirs.betas, ours, rtol=1e-5, atol=1e-7)
    back = run_keys_from_scheduler(config, "x")  # and read back: the same betas
    assert torch.allclose(build_schedule(OmegaConf.create(back["schedule"]), 300).betas, ours, rtol=1e-6)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_one_scheduler_step_is_ddpm_s_ancestral_step(variance):
    # diffusers in float64 (its float32 1 - abar_t is off by 3e-4 relative at t = 1): then the two differ
    # only by ddpm's float32 coefficients, a few float32 epsilons of values of order 1
    scheduler = DDPMScheduler(num_train_timesteps=100, variance_type=variance, clip_sample=True)
    scheduler.set_timesteps(100)
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    scheduler.betas, scheduler.alphas = betas, 1 - betas
    scheduler.alphas_cumprod = torch.cumprod(1 - betas, 0)
    diffusion = Diffusion(Schedule.from_betas(betas))

    def draw(seed: int) -> torch.Tensor:
        return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    x_t, eps_hat = draw(0), 2 * draw(1)  # x0_hat is clipped often
    kind = Variance.small if variance == "fixed_small" else Variance.large
    for step in (57, 1, 0):
        theirs = scheduler.step(eps_hat, step, x_t, generator=torch.Generator().manual_seed(2)).prev_sample
        noise = draw(2) if step > 0 else torch.zeros_like(x_t)  # Algorithm 2 adds none at the last step
        t = torch.full((3,), step)
        mean, var, _ = diffusion.p_mean_variance(diffusion.denoiser(lambda *_: eps_hat, True), x_t, t, kind)
        assert torch.allclose(mean + var.sqrt() * noise, theirs, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ the commands
def test_ddpm_sample_reads_a_folder_s_defaults_and_writes_in_the_current_folder(tmp_path, in_process):
    folder = save_pipeline(
        random_unet(TINY8),
        tmp_path / "models" / "tiny-ddpm",
        num_train_timesteps=10,
        variance_type="fixed_large",
        clip_sample=False,
    )
    r = in_process("ddpm-sample", f"ckpt={folder}", "n=2", "device=cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (
        "large variance" in r.stdout and (tmp_path / "generated" / "tiny-ddpm_seed0" / "grid.png").is_file()
    )
    assert "the pipeline's weights" in r.stdout and "no EMA" not in r.stdout
    assert not (tmp_path / "models" / "generated").exists()
    assert load_trained(folder, CPU).default_clip is False


def bad_folder(tmp_path: Path, kind: str) -> Path:
    layout = dict(TINY8)  # a copy: one kind changes it
    folder = tmp_path / kind
    if kind == "not_a_pipeline":
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
        return folder
    if kind == "head_dim":
        layout["attention_head_dim"] = 8
    save_pipeline(random_unet(layout), folder, num_train_timesteps=10)
    if kind == "conditional_unet":
        index = json.loads((folder / "model_index.json").read_text())
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        (folder / "model_index.json").write_text(json.dumps(index))
    if kind == "evil_bin":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        torch.save({"w": Exploit(str(tmp_path / "pwned"))}, folder / "unet" / "diffusion_pytorch_model.bin")
    return folder


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("not_a_pipeline", "is a folder, but not a diffusers pipeline (no model_index.json)"),
        ("conditional_unet", "unet is a UNet2DConditionModel, not a UNet2DModel"),
        ("head_dim", "has a layout model=ho2020 cannot express: attention head dim 8: ho2020 uses one head"),
        ("evil_bin", "diffusion_pytorch_model.bin was refused: loading it would call posix.system"),
    ],
)
def test_bad_pipelines_are_one_line_and_write_nothing(tmp_path, capsys, kind, message):
    folder = bad_folder(tmp_path, kind)
    out = tmp_path / "out"
    for main, args in (
        (cli.sample_main, ["n=2", f"out={out}"]),
        (cli.eval_main, ["data=digits", f"out={out}"]),
    ):
        code, lines, output = run_entry(main, [f"ckpt={folder}", "device=cpu", *args], capsys)
        assert_refused(
            main.__name__.removesuffix("_main").replace("sample", "ddpm-sample").replace("eval", "ddpm-eval"),
            code,
            lines,
            output,
            args,
        )
        assert code == 2 and message in lines[0], lines
    assert not out.exists() and not (tmp_path / "pwned").exists()


def test_ddpm_eval_of_a_folder_needs_data(tmp_path, capsys):
    folder = bad_folder(tmp_path, "fine")
    code, lines, output = run_entry(cli.eval_main, [f"ckpt={folder}", "device=cpu"], capsys)
    assert_refused("ddpm-eval", code, lines, output, [])
    assert "is a diffusers pipeline, which records no data set: name the real images" in lines[0]
    assert not (tmp_path / "eval").exists()


def test_format_diffusers_refuses_model_unet_and_writes_nothing(tmp_path, capsys):
    ckpt = FIXTURES / "tiny_v2.pt"  # a model=unet checkpoint
    out = tmp_path / "pipe"
    code, lines, output = run_entry(
        cli.export_main, [f"ckpt={ckpt}", "format=diffusers", f"out={out}"], capsys
    )
    assert_refused("ddpm-export", code, lines, output, [])
    assert "format=diffusers needs model=ho2020" in lines[0] and "linear attention" in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())
    code, lines, output = run_entry(cli.export_main, [f"ckpt={ckpt}", "format=onnx"], capsys)
    assert_refused("ddpm-export", code, lines, output, [])
    assert "onnx" in lines[0] and "safetensors" in lines[0] and "diffusers" in lines[0]

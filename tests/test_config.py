import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from ddpm.diffusion.gaussian import Loss
from ddpm.errors import ConfigError
from ddpm.validate import validate_sample, validate_train


def test_defaults_compose_to_the_contract(compose_cfg):
    cfg = compose_cfg("train")
    assert cfg.loss is Loss.huber
    assert cfg.timesteps == 200 and cfg.batch_size == 128
    assert cfg.schedule.name == "linear" and cfg.schedule.beta_start == 1e-4 and cfg.schedule.beta_end == 0.02
    assert cfg.data.name == "digits" and cfg.data.image_size == 8 and cfg.data.channels == 1
    assert list(cfg.model.dim_mults) == [1, 2, 4]
    for key in ["steps", "lr", "seed", "device", "sample_every", "checkpoint_every", "log_every"]:
        assert key in cfg
    validate_train(cfg)


def test_the_seed_recipe_is_one_command_away(compose_cfg):
    cfg = compose_cfg(
        "train",
        ["data=fashion_mnist", "timesteps=200", "loss=huber", "batch_size=128", "model.dim_mults=[1,2,4]"]
        + ["lr=1e-3", "lr_warmup=0", "lr_decay=none"],
    )
    assert (cfg.data.image_size, cfg.data.channels) == (28, 1)
    assert cfg.schedule.name == "linear" and cfg.lr == 1e-3 and cfg.lr_decay.name == "none"
    validate_train(cfg)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "quadratic", "sigmoid"])
def test_every_schedule_composes_and_validates(compose_cfg, schedule):
    cfg = compose_cfg("train", [f"schedule={schedule}"])
    assert cfg.schedule.name == schedule
    validate_train(cfg)


@pytest.mark.parametrize(
    ("data", "size", "channels"),
    [("digits", 8, 1), ("folder", 64, 3), ("mnist", 28, 1), ("fashion_mnist", 28, 1), ("cifar10", 32, 3)],
)
def test_every_data_set_composes(compose_cfg, data, size, channels):
    cfg = compose_cfg("train", [f"data={data}"] + (["data.root=/somewhere"] if data == "folder" else []))
    assert (cfg.data.name, cfg.data.image_size, cfg.data.channels) == (data, size, channels)


@pytest.mark.parametrize("loss", ["l1", "l2", "huber"])
def test_loss_choices(compose_cfg, loss):
    assert compose_cfg("train", [f"loss={loss}"]).loss is Loss[loss]


def test_unknown_loss_is_a_merge_error(compose_cfg):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("train", ["loss=mse"])
    assert isinstance(e.value.__cause__, ValidationError)
    assert "expected one of [l1, l2, huber, kl]" in str(e.value.__cause__)


@pytest.mark.parametrize("group", ["schedule", "data", "model"])
def test_unknown_group_option_lists_the_choices(compose_cfg, group):
    with pytest.raises(MissingConfigException) as e:
        compose_cfg("train", [f"{group}=nope"])
    assert e.value.options


@pytest.mark.parametrize(
    "override", ["timestep=10", "schedule.beta_stop=0.1", "model.dims=3", "data.rooot=x", "schedule.s=0.1"]
)
def test_misspelt_keys_fail_at_merge(compose_cfg, override):
    # schedule.s exists only for the cosine schedule: the linear one must reject it
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("train", [override])
    assert isinstance(e.value.__cause__, (ConfigKeyError, ConfigAttributeError))


@pytest.mark.parametrize(
    "override", ["timesteps=ten", "batch_size=1.5", "model.dim_mults=[a]", "data.hflip=maybe"]
)
def test_wrong_types_fail_at_merge(compose_cfg, override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg("train", [override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["timesteps=0"], r"timesteps=0 is invalid: it must be >= 1"),
        (["batch_size=0"], r"batch_size=0 is invalid"),
        (["steps=0"], r"steps=0 is invalid"),
        (["lr=0"], r"lr=0.0 is invalid"),
        (["device=tpu"], r"device='tpu' is invalid: choose one of auto, cpu, cuda"),
        (["schedule.beta_start=0.5", "schedule.beta_end=0.1"], r"beta_start=0.5.*beta_end=0.1"),
        (["schedule=cosine", "schedule.max_beta=1.5"], r"schedule.max_beta=1.5"),
        (["schedule=sigmoid", "schedule.start=3", "schedule.end=-3"], r"schedule.start=3.0 must be below"),
        (["data.image_size=10"], r"data.image_size=10 is invalid for model.dim_mults=\[1, 2, 4\]"),
        (["data.channels=2"], r"data.channels=2 is invalid: choose one of 1, 3"),
        (["model.dim=7"], r"model.dim=7 is invalid"),
        (["model.dim_mults=[]"], r"model.dim_mults=\[\] is invalid"),
        (["model.resnet_block_groups=5"], r"model.resnet_block_groups=5"),
        (["sample_every=-1"], r"sample_every=-1"),
        (["checkpoint_every=-1"], r"checkpoint_every=-1"),
        (["log_every=0"], r"log_every=0"),
        (["sample_n=0"], r"sample_n=0"),
        (["forward_n=-1"], r"forward_n=-1"),
        (["data.num_workers=-1"], r"data.num_workers=-1"),
        (["data.on_device=maybe"], r"data.on_device='maybe' is invalid: choose one of auto, true, false"),
        (["data.on_device=1"], r"data.on_device=1 is invalid"),  # a number is not a bool
        (["data.on_device_max_mb=-1"], r"data.on_device_max_mb=-1.0 is invalid"),
        (["sampler=euler"], r"sampler='euler' is invalid: choose one of ddpm, ddim, dpm_solver\+\+"),
        (["sample_steps=0"], r"sample_steps=0 is invalid: it must be >= 1 \(at most T are visited"),
        (["eval.sample_steps=0"], r"eval.sample_steps=0 is invalid: it must be >= 1"),
        (["eta=-1"], r"eta=-1.0 is invalid"),
        (["min_snr_gamma=-1"], r"min_snr_gamma=-1.0 is invalid"),
        (["offset_noise=-0.1"], r"offset_noise=-0.1 is invalid"),
        (["grad_accum=0"], r"grad_accum=0 is invalid"),
        (["grad_accum=3"], r"grad_accum=3 is invalid: it must divide batch_size=128"),
        (["grad_clip=-1"], r"grad_clip=-1.0 is invalid"),
        (["lr_warmup=-1"], r"lr_warmup=-1 is invalid"),
        (["ema.decay=1"], r"ema.decay=1.0 is invalid"),
        (["ema.warmup=-1"], r"ema.warmup=-1.0 is invalid"),
        (["model.dropout=1"], r"model.dropout=1.0 is invalid"),
        (
            ["schedule.zero_terminal_snr=true"],
            r"objective=eps is invalid with schedule.zero_terminal_snr=true",
        ),
    ],
)
def test_semantic_checks_name_the_bad_value(compose_cfg, overrides, message):
    cfg = compose_cfg("train", overrides)
    with pytest.raises(ConfigError, match=message):
        validate_train(cfg)


@pytest.mark.parametrize(
    ("override", "message"), [("n=0", "n=0"), ("batch_size=0", "batch_size=0"), ("device=gpu", "device")]
)
def test_sample_checks(compose_cfg, override, message):
    cfg = compose_cfg("sample", ["ckpt=x.pt", override])
    with pytest.raises(ConfigError, match=message):
        validate_sample(cfg)


def test_annotated_fashion_mnist_preset(compose_cfg):
    cfg = compose_cfg("train", ["experiment=annotated_fashion_mnist"])
    assert (cfg.data.name, cfg.data.image_size, cfg.data.channels) == ("fashion_mnist", 28, 1)
    assert cfg.timesteps == 200 and cfg.schedule.name == "linear"
    assert (cfg.schedule.beta_start, cfg.schedule.beta_end) == (1e-4, 0.02)
    assert cfg.loss is Loss.huber and cfg.objective.name == "eps"
    assert cfg.model.name == "unet" and cfg.model.dim == 28 and list(cfg.model.dim_mults) == [1, 2, 4]
    assert cfg.batch_size == 128 and cfg.lr == 1e-3
    assert cfg.ema.decay == 0 and cfg.clip_x0 is False and cfg.sampler == "ddpm"
    validate_train(cfg)


def test_ddpm_cifar10_preset(compose_cfg):
    cfg = compose_cfg("train", ["experiment=ddpm_cifar10"])
    assert (cfg.data.name, cfg.data.image_size, cfg.data.channels, cfg.data.hflip) == ("cifar10", 32, 3, True)
    assert cfg.timesteps == 1000 and cfg.schedule.name == "linear"
    assert (cfg.schedule.beta_start, cfg.schedule.beta_end) == (1e-4, 0.02)
    assert cfg.loss is Loss.l2 and cfg.objective.name == "eps"
    assert cfg.model.name == "ho2020" and list(cfg.model.dim_mults) == [1, 2, 2, 2]
    assert (
        cfg.model.num_res_blocks == 2
        and list(cfg.model.attn_resolutions) == [16]
        and cfg.model.dropout == 0.1
    )
    assert cfg.lr == 2e-4 and cfg.batch_size == 128 and cfg.lr_warmup == 5000
    assert cfg.ema.decay == 0.9999 and cfg.grad_clip == 1.0 and cfg.steps == 800000
    # sampled over all 1,000 steps with beta_t, as their run_cifar.py (model_var_type='fixedlarge')
    assert cfg.sample_steps is None and cfg.ddpm_variance.name == "large"
    validate_train(cfg)  # the model's size is test_unet's business


def test_preset_keys_can_still_be_overridden(compose_cfg):
    cfg = compose_cfg("train", ["experiment=ddpm_cifar10", "lr=1e-4", "model.dropout=0.2"])
    assert cfg.lr == 1e-4 and cfg.model.dropout == 0.2


def test_the_cifar10_preset_composes_with_nichol_and_dhariwal_s_keys(compose_cfg):
    # the README's nearest to their CIFAR-10 model: another schedule group over the preset's
    overrides = ["experiment=ddpm_cifar10", "learn_sigma=true", "schedule=cosine", "timesteps=4000"]
    overrides += ["model.num_res_blocks=3", "model.dropout=0.3", "model.attn_resolutions=[16,8]", "lr=1e-4"]
    cfg = compose_cfg("train", [*overrides, "steps=500000"])
    assert cfg.schedule.name == "cosine" and cfg.learn_sigma and cfg.timesteps == 4000
    assert list(cfg.model.attn_resolutions) == [16, 8] and cfg.model.num_res_blocks == 3
    validate_train(cfg)


def test_unknown_preset_lists_the_choices(compose_cfg):
    with pytest.raises(MissingConfigException) as e:
        compose_cfg("train", ["experiment=imagenet"])
    assert sorted(e.value.options) == ["annotated_fashion_mnist", "ddpm_256", "ddpm_cifar10"]

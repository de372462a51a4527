import pytest
import torch

from ddpm.errors import ConfigError
from ddpm.models import build_model, check_model
from ddpm.models.unet import UNet


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("dim_mults", "size"), [((1,), 5), ((1, 2), 8), ((1, 2, 4), 28), ((1, 2, 2, 2), 32)])
def test_output_has_the_input_shape(channels, dim_mults, size):
    model = UNet(
        channels=channels, dim=8, dim_mults=dim_mults, resnet_block_groups=2, attn_heads=2, attn_dim_head=4
    )
    x = torch.randn(3, channels, size, size)
    out = model(x, torch.tensor([0, 10, 199]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_output_depends_on_the_timestep():
    torch.manual_seed(0)
    model = UNet(channels=1, dim=8, dim_mults=(1, 2), resnet_block_groups=2, attn_heads=2, attn_dim_head=4)
    x = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1)
    out = model(x, torch.tensor([3, 150]))
    assert not torch.allclose(out[0], out[1])


def test_every_parameter_gets_a_gradient():
    model = UNet(channels=3, dim=8, dim_mults=(1, 2), resnet_block_groups=2, attn_heads=2, attn_dim_head=4)
    model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_build_model_follows_the_config(compose_cfg):
    cfg = compose_cfg("train", ["model.dim=16", "model.dim_mults=[1,2,4]"])
    model = build_model(cfg.model, channels=3, image_size=8)
    assert model.init_conv.out_channels == 16
    assert model.mid_block1.block1.proj.in_channels == 64
    assert model.final_conv.out_channels == 3
    assert model.downsample_factor == 4


@pytest.mark.parametrize(("size", "dim_mults"), [(10, [1, 2, 4]), (28, [1, 2, 4, 8]), (9, [1, 2])])
def test_image_size_must_survive_the_halvings(compose_cfg, size, dim_mults):
    cfg = compose_cfg("train", [f"data.image_size={size}", f"model.dim_mults={dim_mults}".replace(" ", "")])
    with pytest.raises(
        ConfigError, match=rf"data.image_size={size} is invalid.*multiple of {2 ** (len(dim_mults) - 1)}"
    ):
        check_model(cfg.model, size)


def test_group_count_must_divide_the_widths(compose_cfg):
    cfg = compose_cfg("train", ["model.dim=12", "model.resnet_block_groups=8"])
    with pytest.raises(ConfigError, match=r"model.resnet_block_groups=8 .* \[12, 24, 48\]"):
        check_model(cfg.model, 8)


def test_ho2020_is_the_35_7m_cifar10_model(compose_cfg):
    cfg = compose_cfg("train", ["model=ho2020", "data=cifar10"])
    model = build_model(cfg.model, 3, 32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(35.7e6, abs=0.5e6)
    # attention only at 16x16: in the second level down, the second level up and the middle
    from ddpm.models.unet_ho import AttnBlock

    assert [isinstance(a, AttnBlock) for lvl in model.down for a in lvl.attns] == [0, 0, 1, 1, 0, 0, 0, 0]
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == 2 + 3 + 1


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    ("dim_mults", "size", "attn"), [((1,), 8, [8]), ((1, 2), 16, [8]), ((1, 2, 2), 28, [14, 7])]
)
def test_ho2020_output_shape(channels, dim_mults, size, attn):
    from ddpm.models.unet_ho import HoUNet

    model = HoUNet(
        channels, size, ch=32, ch_mult=dim_mults, num_res_blocks=1, attn_resolutions=attn, dropout=0.0
    )
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 99])).shape == x.shape


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.dim=48"], r"model.dim=48 is invalid for model=ho2020: .*multiple of 32"),
        (
            ["model.attn_resolutions=[12]"],
            r"model.attn_resolutions=\[12\] is invalid: \[12\] is not a resolution",
        ),
        (["model.num_res_blocks=0"], r"model.num_res_blocks=0 is invalid"),
    ],
)
def test_ho2020_checks(compose_cfg, overrides, message):
    cfg = compose_cfg("train", ["model=ho2020", "data=cifar10", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_model(cfg.model, 32)

"""LayerHooks against an independent oracle (torchvision's FX feature extractor), plus the
contract's edge cases: globs, early stop, tuple outputs, shared modules, handle removal."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from pipeline.config import Pool
from pipeline.errors import ConfigError
from pipeline.extraction.hooks import LOGITS, LayerHooks, list_layers, pool_output, resolve_layers


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_matches_torchvision_feature_extractor(
    resnet: torch.nn.Module, images: torch.Tensor
) -> None:
    oracle = create_feature_extractor(
        resnet, {"layer2": "layer2", "layer4.1.conv1": "conv", "avgpool": "avgpool", "fc": "fc"}
    )
    with torch.inference_mode():
        expected = oracle(images)
        with LayerHooks(
            resnet, ["layer2", "layer4.1.conv1", "avgpool", LOGITS], Pool.auto
        ) as hooks:
            got = hooks(images)
    assert list(got) == ["layer2", "layer4.1.conv1", "avgpool", LOGITS]
    torch.testing.assert_close(got["layer2"], expected["layer2"].mean(dim=(2, 3)))
    torch.testing.assert_close(got["layer4.1.conv1"], expected["conv"].mean(dim=(2, 3)))
    torch.testing.assert_close(got["avgpool"], expected["avgpool"].flatten(1))
    torch.testing.assert_close(got[LOGITS], expected["fc"])


@pytest.mark.parametrize("pool", [Pool.max, Pool.flatten])
def test_explicit_pooling_matches_oracle(
    resnet: torch.nn.Module, images: torch.Tensor, pool: Pool
) -> None:
    expected = create_feature_extractor(resnet, ["layer3"])(images)["layer3"]
    with torch.inference_mode(), LayerHooks(resnet, ["layer3"], pool) as hooks:
        got = hooks(images)["layer3"]
    want = expected.amax(dim=(2, 3)) if pool is Pool.max else expected.flatten(1)
    torch.testing.assert_close(got, want)


def test_globs_expand_in_model_order_one_part_per_star(resnet: torch.nn.Module) -> None:
    assert resolve_layers(resnet, ["layer*"]) == ["layer1", "layer2", "layer3", "layer4"]
    assert resolve_layers(resnet, ["layer4.*"]) == ["layer4.0", "layer4.1"]
    assert resolve_layers(resnet, ["fc", "layer1", "fc"]) == ["fc", "layer1"]


def test_unknown_layer_names_the_closest(resnet: torch.nn.Module) -> None:
    with pytest.raises(ConfigError, match=r"'layer5'.*closest: layer\d"):
        resolve_layers(resnet, ["layer5"])
    with pytest.raises(ConfigError, match="layers is empty"):
        resolve_layers(resnet, [])


def test_forward_stops_after_the_last_hooked_layer(
    resnet: torch.nn.Module, images: torch.Tensor
) -> None:
    ran = []
    probe = resnet.layer3.register_forward_hook(lambda *_: ran.append("layer3"))
    try:
        with torch.inference_mode(), LayerHooks(resnet, ["layer1", "layer2"], Pool.avg) as hooks:
            early = hooks(images)
        assert ran == [], "layer3 ran although layer2 was the last hooked layer"
        with torch.inference_mode(), LayerHooks(resnet, ["layer2", LOGITS], Pool.avg) as hooks:
            full = hooks(images)
        assert ran == ["layer3"], "asking for logits must run the whole model"
    finally:
        probe.remove()
    torch.testing.assert_close(early["layer2"], full["layer2"])


def test_handles_removed_on_exit_and_on_error(
    resnet: torch.nn.Module, images: torch.Tensor
) -> None:
    with LayerHooks(resnet, ["layer1", "avgpool"], Pool.auto) as hooks:
        hooks(images)
    assert not resnet.layer1._forward_hooks and not resnet.avgpool._forward_hooks
    with pytest.raises(ConfigError), LayerHooks(resnet, ["layer1"], Pool.cls) as hooks:
        hooks.describe(images[:1])  # cls does not fit a conv map
    assert not resnet.layer1._forward_hooks


def test_pool_that_does_not_fit_says_what_does(
    resnet: torch.nn.Module, images: torch.Tensor
) -> None:
    with (
        pytest.raises(ConfigError, match=r"pool=mean does not fit layer 'layer1'.*avg"),
        LayerHooks(resnet, ["layer1"], Pool.mean) as hooks,
    ):
        hooks.describe(images[:1])


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Conv2d(3, 4, 3)
        self.shared = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.body(x)
        return y, self.shared(self.shared(y) - 1)


def test_tuple_outputs_need_an_explicit_key(images: torch.Tensor) -> None:
    model = TwoHeads()
    with (
        LayerHooks(model, [LOGITS], Pool.avg) as hooks,
        pytest.raises(ConfigError, match=r"returns a tuple.*output_key=<one of \[0, 1\]>"),
    ):
        hooks(images)
    with LayerHooks(model, [LOGITS], Pool.avg, output_key="1") as hooks:
        got = hooks(images)[LOGITS]
    torch.testing.assert_close(got, model(images)[1].mean(dim=(2, 3)))


def test_module_called_twice_is_an_error(images: torch.Tensor) -> None:
    with (
        LayerHooks(TwoHeads(), ["shared"], Pool.avg) as hooks,
        pytest.raises(ConfigError, match="ran more than once"),
    ):
        hooks.describe(images[:1])


def test_vit_tokens_pool_to_class_token_by_default() -> None:
    model = timm.create_model("test_vit", pretrained=False).eval()
    x = torch.randn(2, 3, *model.pretrained_cfg["input_size"][1:])
    with torch.inference_mode(), LayerHooks(model, ["blocks.*"], Pool.auto) as hooks:
        info = hooks.describe(x[:1])
        out = hooks(x)
    tokens, width = info["blocks.0"].shape
    assert info["blocks.0"].pool is Pool.cls and info["blocks.0"].dim == width
    assert all(v.shape == (2, width) for v in out.values())
    assert len(out) == len(model.blocks) and tokens > model.num_prefix_tokens


def test_pool_output_mean_skips_prefix_tokens() -> None:
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    torch.testing.assert_close(pool_output(x, Pool.mean, prefix_tokens=1), x[:, 1:].mean(1))
    torch.testing.assert_close(pool_output(x, Pool.cls), x[:, 0])


def test_list_layers_reports_shapes_dims_and_calls(resnet: torch.nn.Module) -> None:
    rows = {r["layer"]: r for r in list_layers(resnet, torch.zeros(1, 3, 64, 64))}
    assert rows["layer2"]["output"] == "128x8x8" and rows["layer2"]["dim"] == 128
    assert rows["fc"]["dim"] == 1000 and rows["fc"]["bytes"] == 4000
    assert rows["layer1.0.relu"]["calls"] == 2  # torchvision's BasicBlock reuses its ReLU
    gridded = {r["layer"]: r for r in list_layers(resnet, torch.zeros(1, 3, 64, 64), Pool.grid)}
    assert gridded["layer2"]["dim"] == 4 * 128 and gridded["fc"]["dim"] == 1000


def test_gem_against_hand_computed_means() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    # ((1 + 8 + 27 + 64) / 4) ** (1 / 3) = 25 ** (1 / 3)
    torch.testing.assert_close(pool_output(x, Pool.gem, gem_p=3.0), torch.tensor([[25 ** (1 / 3)]]))
    torch.testing.assert_close(pool_output(x, Pool.gem, gem_p=1.0), torch.tensor([[2.5]]))
    # Negative activations are clamped away: ((0 + 0 + 0 + 64) / 4) ** (1 / 2) = 4.
    signed = torch.tensor([[-1.0, -2.0], [0.0, 8.0]]).reshape(1, 1, 2, 2)
    torch.testing.assert_close(pool_output(signed, Pool.gem, gem_p=2.0), torch.tensor([[4.0]]))
    # Half precision in, float32 out: 300 ** 3 would overflow float16.
    big = torch.full((1, 2, 3, 3), 300.0, dtype=torch.float16)
    torch.testing.assert_close(pool_output(big, Pool.gem), torch.full((1, 2), 300.0))


def test_grid_concatenates_cell_averages_cell_by_cell() -> None:
    x = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4)  # channel 1 = channel 0 + 16
    got = pool_output(x, Pool.grid, grid=2)
    # Cells of channel 0, row-major: top-left {0, 1, 4, 5}, top-right {2, 3, 6, 7}, ...
    cells = [2.5, 4.5, 10.5, 12.5]
    expected = [v for c in cells for v in (c, c + 16)]
    torch.testing.assert_close(got, torch.tensor([expected]))
    # A map smaller than the grid gets one cell per position, never repeated ones.
    torch.testing.assert_close(pool_output(x[:, :, :1, :1], Pool.grid, grid=4), x[:, :, 0, 0])


def test_grid_lays_vit_patch_tokens_back_on_their_square() -> None:
    tokens = torch.randn(2, 1 + 16, 8)  # a class token, then 4 x 4 patches
    got = pool_output(tokens, Pool.grid, prefix_tokens=1, grid=2)
    patches = tokens[:, 1:].reshape(2, 4, 4, 8)
    top_left = patches[:, :2, :2].mean(dim=(1, 2))
    assert got.shape == (2, 4 * 8)
    torch.testing.assert_close(got[:, :8], top_left)
    with pytest.raises(ConfigError, match="square"):
        pool_output(tokens[:, :-1], Pool.grid, prefix_tokens=1)


def test_multi_scale_sums_unit_descriptors_of_each_scale(
    resnet: torch.nn.Module, images: torch.Tensor
) -> None:
    oracle = create_feature_extractor(resnet, ["layer3"])
    half = torch.nn.functional.interpolate(
        images, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False
    )
    with torch.inference_mode():
        expected = sum(
            torch.nn.functional.normalize(oracle(x)["layer3"].mean(dim=(2, 3)), dim=1)
            for x in (images, half)
        )
        with LayerHooks(resnet, ["layer3"], Pool.avg, scales=[1.0, 0.5]) as hooks:
            info = hooks.describe(images[:1])
            got = hooks(images)["layer3"]
    torch.testing.assert_close(got, expected)
    assert info["layer3"].dim == 256 and info["layer3"].params == {}


def test_multi_scale_still_stops_early_and_records_pool_params(
    resnet: torch.nn.Module, images: torch.Tensor
) -> None:
    ran = []
    probe = resnet.layer3.register_forward_hook(lambda *_: ran.append("layer3"))
    try:
        with (
            torch.inference_mode(),
            LayerHooks(resnet, ["layer2"], Pool.grid, grid=3, scales=[1.0, 0.7]) as hooks,
        ):
            info = hooks.describe(images[:1])
            ran.clear()  # describe runs the whole model once, by design
            out = hooks(images)
    finally:
        probe.remove()
    assert ran == [] and out["layer2"].shape == (3, 128 * 9)
    assert info["layer2"].params == {"grid": 3}


def test_multi_scale_refuses_poolings_whose_dim_depends_on_size(
    resnet: torch.nn.Module, images: torch.Tensor
) -> None:
    with (
        pytest.raises(ConfigError, match=r"another dim at scale 0\.5"),
        LayerHooks(resnet, ["layer2"], Pool.flatten, scales=[1.0, 0.5]) as hooks,
    ):
        hooks.describe(images[:1])
    with pytest.raises(ConfigError, match="scales must be positive"):
        LayerHooks(resnet, ["layer2"], Pool.avg, scales=[])


@pytest.mark.slow
def test_a_compiled_model_keeps_its_hooks_early_stop_and_one_graph(
    resnet: torch.nn.Module, images: torch.Tensor
) -> None:
    """compile(): the hooks still capture, the pass still stops after the last hooked layer,
    and a short batch is padded to the batch size, so it runs the same graph."""
    from torch._dynamo.utils import counters

    ran = []
    probe = resnet.layer3.register_forward_hook(lambda *_: ran.append("layer3"))
    try:
        with torch.inference_mode(), LayerHooks(resnet, ["layer1", "layer2"], Pool.avg) as hooks:
            hooks.describe(images[:1])
            eager = hooks(images)
            ran.clear()
            torch._dynamo.reset()
            hooks.compile(batch_size=len(images))
            compiled = hooks(images)
            graphs = counters["stats"]["unique_graphs"]
            short = hooks(images[:2])
            assert counters["stats"]["unique_graphs"] == graphs, "the short batch recompiled"
    finally:
        probe.remove()
    assert ran == [], "layer3 ran although layer2 was the last hooked layer"
    for name in ("layer1", "layer2"):
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(short[name], eager[name][:2], rtol=1e-4, atol=1e-5)

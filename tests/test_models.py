import pytest
import torch

from cilkit.models.backbones import build_backbone, resnet18, resnet32
from cilkit.models.network import build_network


@pytest.mark.parametrize(
    "name, shape, dim",
    [("resnet32", (3, 32, 32), 64), ("resnet18", (3, 64, 64), 512), ("resnet18_cifar", (3, 32, 32), 512),
     ("convnet", (1, 8, 8), 128), ("mlp", (1, 28, 28), 256)],
)
def test_backbone_feature_sizes(name, shape, dim):
    net = build_backbone(name, shape)
    out = net(torch.randn(2, *shape))
    assert net.out_dim == dim and out["features"].shape == (2, dim)


def test_resnet32_is_the_cifar_resnet():
    net = resnet32()
    assert len(net.stages) == 3 and [len(s) for s in net.stages] == [5, 5, 5]
    out = net(torch.randn(2, 3, 32, 32))
    assert [m.shape[1:] for m in out["maps"]] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    # 0.46M parameters with the parameter-free (option A) shortcut of He et al.
    assert 0.45e6 < sum(p.numel() for p in net.parameters()) < 0.48e6


def test_last_relu_off_gives_signed_features():
    net = resnet32(last_relu=False).eval()
    f = net(torch.randn(8, 3, 32, 32))["features"]
    assert (f < 0).any()
    assert (resnet32().eval()(torch.randn(8, 3, 32, 32))["features"] >= 0).all()


def test_head_grows_and_keeps_old_rows():
    net = build_network("mlp", (1, 4, 4), hidden=[8])
    net.add_classes(3)
    x = torch.randn(5, 1, 4, 4)
    before = net(x)["logits"].detach()
    w0 = net.head.weight.detach().clone()
    net.add_classes(2)
    after = net(x)["logits"]
    assert after.shape == (5, 5) and net.n_classes == 5
    assert torch.allclose(after[:, :3], before)
    assert torch.equal(net.head.weight[:3], w0)
    assert net.task_slice(1) == slice(3, 5)


# -- the ResNet options of the official PODNet networks (docs/methods/podnet.md) ---------------------


def _blocks(net):
    return [b for stage in net.stages for b in stage]


def _block_outputs(net, x):
    outs = []
    hooks = [b.register_forward_hook(lambda mod, args, out: outs.append(out)) for b in _blocks(net)]
    net(x)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("name, shape", [("resnet32", (3, 32, 32)), ("resnet18", (3, 64, 64)), ("resnet18_cifar", (3, 16, 16))])
def test_resnet_options_at_their_defaults_change_nothing(name, shape):
    x = torch.randn(3, *shape)
    torch.manual_seed(0)
    plain = build_backbone(name, shape, last_relu=False)
    torch.manual_seed(0)
    explicit = build_backbone(name, shape, last_relu=False, block_relu=True, stage_relu=True, zero_residual=False,
                              penultimate_map=False)
    for a, b in zip(plain.state_dict().values(), explicit.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for mode in ("train", "eval"):
        getattr(plain, mode)(), getattr(explicit, mode)()
        pa, pb = plain(x), explicit(x)
        assert torch.equal(pa["features"], pb["features"])
        assert len(pa["maps"]) == len(pb["maps"]) and all(torch.equal(a, b) for a, b in zip(pa["maps"], pb["maps"]))
    # the options draw no random numbers: the same seed gives the same convolutions with them
    torch.manual_seed(0)
    official = build_backbone(name, shape, last_relu=False, block_relu=False, zero_residual=True, penultimate_map=True)
    convs = [k for k in plain.state_dict() if k.endswith("weight") and plain.state_dict()[k].dim() == 4]
    assert convs and all(torch.equal(plain.state_dict()[k], official.state_dict()[k]) for k in convs)


def test_block_relu_off_leaves_every_block_signed():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    default = resnet32(last_relu=False).eval()
    outs = _block_outputs(default, x)
    assert all((o >= 0).all() for o in outs[:-1]) and (outs[-1] < 0).any()  # ReLU after every block but the last
    torch.manual_seed(0)
    rebuffi = resnet32(last_relu=False, block_relu=False).eval()
    assert not any(b.relu for b in _blocks(rebuffi))
    outs = _block_outputs(rebuffi, x)
    assert len(outs) == 15 and all((o < 0).any() for o in outs)  # no block's output went through a ReLU
    assert all((m < 0).any() for m in rebuffi(x)["maps"])  # so every POD map is signed


def test_stage_relu_off_drops_only_the_relu_at_the_end_of_each_stage():
    torch.manual_seed(0)
    net = resnet18(last_relu=False, stage_relu=False).eval()
    assert [b.relu for b in _blocks(net)] == [True, False] * 4  # official resnet18: 2 blocks a stage
    outs = _block_outputs(net, torch.randn(2, 3, 64, 64))
    assert all((o >= 0).all() for o in outs[0::2]) and all((o < 0).any() for o in outs[1::2])


def test_zero_residual_makes_a_fresh_block_its_shortcut():
    torch.manual_seed(0)
    net = resnet32(zero_residual=True, block_relu=False)
    assert all((b.bn2.weight == 0).all() and (b.bn1.weight == 1).all() for b in _blocks(net))
    x = torch.randn(2, 16, 8, 8)
    first, down = net.stages[0][0], net.stages[1][0]  # 16 -> 16, and 16 -> 32 channels at stride 2
    for mode in ("train", "eval"):
        first.train(mode == "train"), down.train(mode == "train")
        assert torch.equal(first(x), x)
        expected = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 16, 4, 4)], 1)  # option A: subsample, zero channels
        assert torch.equal(down(x), expected)
    # shortcut B (resnet18): the block's output is its 1x1 projection
    net18 = resnet18(zero_residual=True, block_relu=False).eval()
    block = net18.stages[1][0]
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(block(x), block.down(x))
    # and the default keeps the BatchNorm scales at 1
    assert all((b.bn2.weight == 1).all() for b in _blocks(resnet32()))


def test_penultimate_map_is_the_output_of_the_block_before_the_last():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    three = resnet32(last_relu=False).eval()
    torch.manual_seed(1)
    four = resnet32(last_relu=False, penultimate_map=True).eval()
    out3, out4 = three(x), four(x)
    assert [m.shape[1:] for m in out4["maps"]] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (64, 8, 8)]
    with torch.no_grad():
        h = four.stages[1](four.stages[0](four.stem(x)))
        for block in four.stages[2][:4]:
            h = block(h)
    assert torch.equal(out4["maps"][2], h)  # after 4 of the last stage's 5 blocks: official stage_3
    assert torch.equal(out4["maps"][3], out3["maps"][2]) and torch.equal(out4["features"], out3["features"])
    assert all(torch.equal(a, b) for a, b in zip(out4["maps"][:2], out3["maps"][:2]))


@pytest.mark.parametrize("name, shape", [("convnet", (1, 8, 8)), ("mlp", (1, 8, 8))])
def test_resnet_options_are_refused_by_a_backbone_without_blocks(name, shape):
    build_backbone(name, shape, block_relu=True, zero_residual=False)  # the defaults are what it is
    for option in ({"block_relu": False}, {"stage_relu": False}, {"zero_residual": True}, {"penultimate_map": True}):
        with pytest.raises(ValueError, match="no residual blocks"):
            build_backbone(name, shape, **option)

"""Networks of qsmprep.dl: shapes, config validation, DSBN, adaptive convolution (CPU, small)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
import torch.nn.functional as F  # noqa: E402

from qsmprep.dl.nets import (  # noqa: E402
    ARCHS,
    DOMAINS,
    AdaptiveConv3d,
    DomainBatchNorm3d,
    FilterManifoldNetwork,
    build_model,
    default_config,
)

SIDE = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 1.0], [0.8, 0.8, 1.5, 0.3, 0.0, 0.954]])


def small(arch, **kw):
    torch.manual_seed(0)
    return build_model(default_config(arch, base_channels=4, depth=3, **kw))


def test_import_qsmprep_does_not_import_torch():
    code = "import sys, qsmprep, qsmprep.dl; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("depth", "shape"),
    [(2, (16, 18, 20)), (3, (16, 20, 24)), (3, (32, 16, 28)), (4, (16, 24, 32))],
)
def test_output_shape_equals_input(arch, depth, shape):
    model = build_model(default_config(arch, base_channels=4, depth=depth)).eval()
    assert model.multiple == 2 ** (depth - 1)
    x = torch.randn(2, 2, *shape)
    with torch.no_grad():
        y = model(x, side=SIDE)
    assert y.shape == (2, 1, *shape)
    assert y.dtype == torch.float32
    assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize(
    ("norm", "activation"), [("batch", "relu"), ("instance", "leaky_relu"), ("none", "elu")]
)
def test_norm_and_activation_options_train_mode(norm, activation):
    model = small("unet", norm=norm, activation=activation).train()
    y = model(torch.randn(2, 2, 16, 16, 16))
    y.square().mean().backward()
    assert y.shape == (2, 1, 16, 16, 16)
    assert all(p.grad is not None for p in model.parameters())


def test_default_config_values():
    cfg = default_config("adaptive")
    assert cfg["base_channels"] == 16 and cfg["depth"] == 5 and cfg["activation"] == "elu"
    assert cfg["norm"] == "batch" and cfg["fmn_hidden"] == (64, 64, 64) and cfg["n_side"] == 6
    assert cfg["field_scale"] == 10.0 and cfg["chi_scale"] == 10.0
    assert default_config("dsbn")["norm"] == "dsbn"
    assert default_config("unet")["norm"] == "batch"
    model = build_model({"arch": "unet"})
    assert model.multiple == 16 and model.config == default_config("unet")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"arch": "resnet"}, "unknown arch"),
        ({"arch": "unet", "channels": 3}, "unknown model config keys"),
        ({"arch": "dsbn", "norm": "batch"}, "needs norm 'dsbn'"),
        ({"arch": "unet", "depth": 1}, "depth"),
        ({"arch": "unet", "norm": "group"}, "norm"),
        ({"arch": "unet", "activation": "gelu"}, "activation"),
        ({"arch": "unet", "chi_scale": 0}, "chi_scale"),
        ({"arch": "adaptive", "fmn_hidden": (8, 8)}, "fmn_hidden"),
        ({"depth": 3}, "'arch'"),
    ],
)
def test_bad_config(config, match):
    with pytest.raises(ValueError, match=match):
        build_model(config)


@pytest.mark.parametrize("shape", [(16, 16, 18), (8, 16, 16)])
def test_spatial_size_error_names_shape_and_multiple(shape):
    model = build_model(default_config("unet", base_channels=4, depth=5))
    with pytest.raises(ValueError, match=r"multiple of 16") as err:
        model(torch.zeros(1, 2, *shape))
    assert str(shape) in str(err.value)


def test_wrong_channels_and_rank():
    model = small("unet")
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\)"):
        model(torch.zeros(2, 16, 16, 16))


def test_adaptive_needs_side_information():
    model = small("adaptive")
    x = torch.zeros(2, 2, 16, 16, 16)
    with pytest.raises(ValueError, match=r"side=\(B, 6\).*voxel_size"):
        model(x)
    with pytest.raises(ValueError, match="side has shape"):
        model(x, side=torch.ones(2, 5))
    with pytest.raises(ValueError, match="positive"):
        model(x, side=torch.tensor([[0.0, 1, 1, 0, 0, 1]]))
    # one row of side information is broadcast to the batch
    assert model.eval()(x, side=SIDE[:1]).shape == (2, 1, 16, 16, 16)


# --- domain-specific batch norm ---------------------------------------------------------------


def _bn_stats(model, domain):
    return [
        (m.bns[domain].running_mean.clone(), m.bns[domain].running_var.clone())
        for m in model.modules()
        if isinstance(m, DomainBatchNorm3d)
    ]


def test_dsbn_separate_running_stats_per_domain():
    model = small("dsbn").train()
    n_dsbn = sum(isinstance(m, DomainBatchNorm3d) for m in model.modules())
    assert n_dsbn == 2 * 3 + 2 * 2 + 2  # 2 per conv block (3 enc, 2 dec) + 1 per up block
    assert not any(
        type(m) is torch.nn.BatchNorm3d and m not in _inner(model) for m in model.modules()
    )
    src0, tgt0 = _bn_stats(model, "source"), _bn_stats(model, "target")
    with torch.no_grad():
        model(torch.randn(2, 2, 16, 16, 16) * 3 + 1, domain="source")
    src1, tgt1 = _bn_stats(model, "source"), _bn_stats(model, "target")
    # every source BN moved, no target BN did (bit-exact)
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(src0, src1, strict=True))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(tgt0, tgt1, strict=True)
    )
    with torch.no_grad():
        model(torch.randn(2, 2, 16, 16, 16), domain="target")
    src2, tgt2 = _bn_stats(model, "source"), _bn_stats(model, "target")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(src1, src2, strict=True))
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(tgt1, tgt2, strict=True))


def _inner(model):
    return {
        bn for m in model.modules() if isinstance(m, DomainBatchNorm3d) for bn in m.bns.values()
    }


def test_dsbn_shares_conv_weights_and_separates_affine():
    dsbn, unet = small("dsbn"), small("unet")
    conv_d = {k: v for k, v in dsbn.state_dict().items() if ".bns." not in k}
    conv_u = {k: v for k, v in unet.state_dict().items() if "norm" not in k}
    # same conv tensors (one copy each), same seed -> same initial values
    assert conv_d.keys() == conv_u.keys()
    assert all(torch.equal(conv_d[k], conv_u[k]) for k in conv_d)
    n_bn_u = sum(p.numel() for n, p in unet.named_parameters() if "norm" in n)
    n_bn_d = sum(p.numel() for n, p in dsbn.named_parameters() if ".bns." in n)
    assert n_bn_d == len(DOMAINS) * n_bn_u
    # both domains send gradients to the same conv weight, each to its own affine
    dsbn.train()
    w = dsbn.encoder[1].conv1.weight
    for domain in DOMAINS:
        dsbn.zero_grad()
        dsbn(torch.randn(2, 2, 16, 16, 16), domain=domain).square().mean().backward()
        assert w.grad is not None and float(w.grad.abs().sum()) > 0
        other = [d for d in DOMAINS if d != domain][0]
        assert dsbn.encoder[1].norm1.bns[domain].weight.grad is not None
        assert dsbn.encoder[1].norm1.bns[other].weight.grad is None


def test_dsbn_eval_output_per_domain_and_default_domain():
    model = small("dsbn").train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 2, 16, 16, 16) * 4 + 2, domain="target")
    model.eval()
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        ys, yt, yd = model(x, domain="source"), model(x, domain="target"), model(x)
        assert torch.equal(yd, ys)  # default domain is "source"
        model.default_domain = "target"
        assert model.config["default_domain"] == "target"
        assert torch.equal(model(x), yt)
    assert not torch.allclose(ys, yt)
    with pytest.raises(ValueError, match="unknown domain"):
        model(x, domain="real")
    with pytest.raises(ValueError, match="default_domain"):
        model.default_domain = "scanner"


def test_domain_batchnorm_layer_matches_batchnorm():
    layer = DomainBatchNorm3d(3)
    ref = torch.nn.BatchNorm3d(3)
    x = torch.randn(2, 3, 4, 4, 4)
    assert torch.allclose(layer(x, "target"), ref(x), atol=1e-6)
    assert torch.allclose(layer.bns["target"].running_mean, ref.running_mean)
    assert torch.equal(layer.bns["source"].running_mean, torch.zeros(3))


# --- adaptive convolution ----------------------------------------------------------------------


def test_dsbn_state_from_batchnorm_reproduces_the_unet_in_both_domains():
    from qsmprep.dl.nets.dsbn import dsbn_state_from_batchnorm

    unet = small("unet").train()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for _ in range(3):
            unet(torch.randn(2, 2, 16, 16, 16))
        for m in unet.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    unet.eval()
    dsbn = small("dsbn")
    dsbn.load_state_dict(dsbn_state_from_batchnorm(unet.state_dict(), dsbn.state_dict()))
    dsbn.eval()
    x = torch.randn(1, 2, 16, 16, 16)
    ref = unet(x)
    for domain in DOMAINS:
        assert torch.allclose(dsbn(x, domain=domain), ref, atol=1e-6)
    wide = build_model(default_config("unet", base_channels=8, depth=3))
    with pytest.raises(ValueError, match="shape"):
        dsbn_state_from_batchnorm(wide.state_dict(), dsbn.state_dict())
    shallow = build_model(default_config("unet", base_channels=4, depth=2))
    with pytest.raises(ValueError, match="has no"):
        dsbn_state_from_batchnorm(shallow.state_dict(), dsbn.state_dict())
    extra = {**unet.state_dict(), "head.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="lacks"):
        dsbn_state_from_batchnorm(extra, dsbn.state_dict())


def test_adaptive_conv_equals_per_sample_conv():
    torch.manual_seed(1)
    conv = AdaptiveConv3d(2, 5, 3, hidden=(16, 16, 16))
    x = torch.randn(2, 2, 8, 9, 10)
    y = conv(x, SIDE)
    w, b = conv.fmn(SIDE)
    assert w.shape == (2, 5, 2, 3, 3, 3) and b.shape == (2, 5)
    for i in range(2):
        ref = F.conv3d(x[i : i + 1], w[i], b[i], padding=1)
        # grouped conv vs one conv per sample: float32 summation order only
        assert torch.allclose(y[i : i + 1], ref, atol=1e-5)


def test_fmn_init_near_he_and_side_dependent():
    torch.manual_seed(0)
    fmn = FilterManifoldNetwork(6, 16, 2, 3, (64, 64, 64))
    he_std = math.sqrt(2.0 / (2 * 27))
    with torch.no_grad():
        w, b = fmn(SIDE)
    ratio = float(w.std() / he_std)
    # the generated kernel starts as a He-initialised kernel (std ratio measured 1.04)
    assert 0.85 < ratio < 1.15, ratio
    # and a small bias (max |b| measured 0.15 He std)
    assert float(b.abs().max()) < 0.5 * he_std
    # different side information -> different kernels; a modest change at initialisation
    # (measured relative difference 0.035 between 1 mm axial and 0.8x0.8x1.5 mm oblique)
    rel = float((w[0] - w[1]).norm() / w[0].norm())
    assert 0.01 < rel < 0.3, rel
    # B0 and -B0 are the same acquisition: identical kernels
    flipped = SIDE.clone()
    flipped[:, 3:] *= -1
    assert torch.allclose(fmn(flipped)[0], w, atol=1e-6)


def test_fmn_receives_gradients_and_first_kernels_differ():
    model = small("adaptive").train()
    y = model(torch.randn(2, 2, 16, 16, 16), side=SIDE)
    y.square().mean().backward()
    fmn = model.encoder[0].conv1.fmn
    assert len(list(fmn.parameters())) == 8  # 4 linear layers
    for name, p in fmn.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
    w, _ = fmn(SIDE)
    assert not torch.allclose(w[0], w[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_param_groups_partition_parameters(arch):
    model = small(arch)
    groups = model.param_groups_for_transfer()
    assert set(groups) == {"fmn", "encoder", "decoder"}
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert (len(groups["fmn"]) > 0) == (arch == "adaptive")
    dec = {id(p) for p in groups["decoder"]}
    assert id(model.final.weight) in dec and id(model.up[0].conv.weight) in dec
    assert id(model.encoder[-1].conv2.weight) in {id(p) for p in groups["encoder"]}

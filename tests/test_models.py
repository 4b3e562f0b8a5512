"""models.py: shapes, the CIFAR adaptations (3x3 stem), the release init, SAMIA's tokens."""

import math

import pytest
import torch
import torch.nn as nn

from common import UsageError
from models import SamiaTransformer, build_attack_model, build_model


def linear_dims(module):
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.fixture(scope="module")
def image_models():
    """Each big model built once for the whole file (building and a first forward take seconds)."""
    torch.manual_seed(0)
    return {name: build_model(name, 7, 3).eval() for name in ("resnet18", "vgg16bn", "densenet121")}


@pytest.mark.parametrize("name", ["resnet18", "vgg16bn", "densenet121"])
def test_image_model_output_shape(image_models, name):
    with torch.no_grad():
        out = image_models[name](torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_small_model_output_shapes():
    x = torch.rand(5, 64)
    assert build_model("columnfc", 10, 64)(x).shape == (5, 10)
    assert build_attack_model("mia_fc", 64, 10)(x).shape == (5, 2)
    assert build_attack_model("transformer", 30, 10)(torch.rand(5, 30)).shape == (5, 2)
    with pytest.raises(ValueError, match="unknown attack model kind 'mlp'; valid: mia_fc, transformer"):
        build_attack_model("mlp", 64, 10)


def test_bad_model_config():
    with pytest.raises(UsageError, match="input_dim is 64"):
        build_model("resnet18", 10, 64)
    with pytest.raises(UsageError, match="unknown model_name 'lenet'"):
        build_model("lenet", 10, 3)


def test_resnet18_cifar_stem_keeps_maxpool(image_models):
    model = image_models["resnet18"]
    conv1 = model.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(model.maxpool, nn.MaxPool2d) and (model.maxpool.kernel_size, model.maxpool.stride) == (3, 2)
    sizes = {}
    hook = model.layer1.register_forward_hook(lambda m, i, o: sizes.update(layer1=o.shape))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    hook.remove()
    assert sizes["layer1"] == (2, 64, 16, 16)  # stride-1 conv, then the 2x max-pool
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert linear_dims(model) == [(512, 7)]


def test_densenet121_cifar_stem(image_models):
    model = image_models["densenet121"]
    conv0 = model.features.conv0
    assert (conv0.kernel_size, conv0.stride, conv0.padding, conv0.bias) == ((3, 3), (1, 1), (1, 1), None)
    pool0 = model.features.pool0
    assert isinstance(pool0, nn.MaxPool2d) and (pool0.kernel_size, pool0.stride) == (3, 2)
    blocks = [m for n, m in model.features.named_children() if n.startswith("denseblock")]
    assert [len(b) for b in blocks] == [6, 12, 24, 16]
    first = blocks[0].denselayer1
    assert first.conv1.out_channels == 4 * 32 and first.conv2.out_channels == 32  # bn_size 4, growth 32
    assert isinstance(model.features.norm5, nn.BatchNorm2d) and linear_dims(model) == [(1024, 7)]


def test_vgg16bn_layout(image_models):
    model = image_models["vgg16bn"]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 13
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and model.avgpool.output_size in (1, (1, 1))
    assert [type(m) for m in model.classifier] == [
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
    ]
    assert linear_dims(model.classifier) == [(512, 4096), (4096, 4096), (4096, 7)]


def test_columnfc_and_mia_fc_layout():
    model = build_model("columnfc", 30, 446)
    assert linear_dims(model) == [(446, 256), (256, 128), (128, 30)]
    assert [name for name, _ in model.named_children() if name.startswith("fc")] == ["fc1", "fc2", "fc3"]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.1]
    attack = build_attack_model("mia_fc", 20, 10)
    assert linear_dims(attack) == [(20, 512), (512, 256), (256, 128), (128, 2)]
    assert [m.p for m in attack.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2]


def test_transformer_layout():
    model = build_attack_model("transformer", 30, 10)
    assert model.norm.num_features == 30 and linear_dims(model.embed) == [(3, 64)]
    layers = model.encoder.layers
    assert len(layers) == 3
    for layer in layers:
        assert layer.self_attn.embed_dim == 64 and layer.self_attn.num_heads == 4
        assert (layer.linear1.in_features, layer.linear1.out_features) == (64, 128)
        assert layer.dropout.p == 0.2
    assert linear_dims(model.head) == [(10 * 64, 64), (64, 2)]


def test_release_init_statistics(image_models):
    model = image_models["vgg16bn"]
    big = model.classifier[3].weight  # 4096 x 4096: xavier-normal std = sqrt(2 / (fan_in + fan_out))
    assert big.std().item() == pytest.approx(math.sqrt(2 / 8192), rel=0.01)
    assert abs(big.mean().item()) < 1e-3
    centred = (big - big.mean()) / big.std()
    assert (centred**4).mean().item() == pytest.approx(3.0, abs=0.05)  # normal, not uniform (kurtosis 1.8)
    conv = model.features[0].weight  # 64 x 3 x 3 x 3: fan_in 27, fan_out 576
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (27 + 576)), rel=0.1)
    for name, built in dict(image_models, columnfc=build_model("columnfc", 10, 64)).items():
        for m in built.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                assert torch.all(m.bias == 0), name
            if isinstance(m, nn.BatchNorm2d):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    fc = build_model("columnfc", 10, 446).fc1.weight
    assert fc.std().item() == pytest.approx(math.sqrt(2 / (446 + 256)), rel=0.05)


def test_transformer_tokens_regroup_after_batchnorm():
    num_cls = 4
    model = SamiaTransformer(num_cls).eval()
    mean = torch.arange(3 * num_cls, dtype=torch.float32) * 0.1
    var = 1 + torch.arange(3 * num_cls, dtype=torch.float32)
    model.norm.running_mean.copy_(mean)
    model.norm.running_var.copy_(var)
    x = torch.randn(2, 3 * num_cls)
    normed = (x - mean) / torch.sqrt(var + model.norm.eps)
    tokens = model.tokens(x)
    assert tokens.shape == (2, num_cls, 3)
    for b in range(2):
        for j in range(num_cls):  # token j = (probs_j, sens_j, onehot_j), each normalised by its own feature stats
            want = torch.stack([normed[b, j], normed[b, num_cls + j], normed[b, 2 * num_cls + j]])
            assert torch.allclose(tokens[b, j], want, atol=1e-6)

    default = SamiaTransformer(num_cls).eval()  # default running stats: mean 0, var 1
    probs, sens = torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[5.0, 6, 7, 8]])
    onehot = torch.tensor([[0.0, 0, 1, 0]])
    got = default.tokens(torch.cat([probs, sens, onehot], 1)) * math.sqrt(1 + default.norm.eps)
    assert torch.allclose(got[0], torch.stack([probs[0], sens[0], onehot[0]], 1), atol=1e-6)


def test_transformer_forward_attends_over_class_tokens():
    """Permuting the classes (the same permutation in all three blocks) permutes the tokens, so
    the encoder output permutes with them (no positional encoding), which the test checks."""
    torch.manual_seed(0)
    num_cls = 5
    model = build_attack_model("transformer", 3 * num_cls, num_cls).eval()
    x = torch.randn(3, 3 * num_cls)
    perm = torch.tensor([2, 0, 4, 1, 3])
    x_perm = torch.cat([x[:, k * num_cls : (k + 1) * num_cls][:, perm] for k in range(3)], 1)
    with torch.no_grad():
        enc = model.encoder(model.embed(model.tokens(x)))
        enc_perm = model.encoder(model.embed(model.tokens(x_perm)))
    assert torch.allclose(enc[:, perm], enc_perm, atol=1e-5)

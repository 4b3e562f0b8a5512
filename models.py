"""Target models (resnet18, vgg16bn, densenet121, columnfc) and attack models (mia_fc, transformer)."""

import torch
import torch.nn as nn

from common import UsageError


def release_init(model: nn.Module) -> nn.Module:
    """The release's init: Conv/Linear weights xavier-normal with zero bias; norm layers weight 1, bias 0.
    Like the release it matches exact classes, so subclasses keep PyTorch's default init (in SAMIA's
    transformer, the attention output projection, a Linear subclass)."""
    for m in model.modules():
        if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model


def resnet18(num_cls: int) -> nn.Module:
    import torchvision.models as tvm  # here, not at the top: slow to import and the tabular runs never need it

    model = tvm.resnet18(weights=None, num_classes=num_cls)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # 32x32 input; max-pool kept
    return model


def vgg16bn(num_cls: int) -> nn.Module:
    """VGG-16 (config D) with BatchNorm, 1x1 adaptive pool, 512-4096-4096-C classifier."""
    import torchvision.models as tvm

    model = tvm.vgg16_bn(weights=None, num_classes=num_cls)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier[0] = nn.Linear(512, 4096)
    return model


def densenet121(num_cls: int) -> nn.Module:
    import torchvision.models as tvm

    model = tvm.densenet121(weights=None, num_classes=num_cls)
    model.features.conv0 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return model


class ColumnFC(nn.Module):
    """The tabular model. Layer names fc1/fc2/fc3 matter: iter_prunetxt prunes fc1 and fc2."""

    def __init__(self, input_dim, num_cls):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, num_cls)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        x = self.drop(torch.relu(self.fc1(x)))
        x = self.drop(torch.relu(self.fc2(x)))
        return self.fc3(x)


def mia_fc(input_dim: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(input_dim, 512),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 2),
    )


class SamiaTransformer(nn.Module):
    """SAMIA's attack model. Input [probs, sensitivities, one-hot] (3C); class j becomes the token
    (probs_j, sens_j, onehot_j), so attention runs over the C classes."""

    def __init__(self, num_cls, d_model=64):
        super().__init__()
        self.num_cls = num_cls
        self.norm = nn.BatchNorm1d(3 * num_cls)
        self.embed = nn.Sequential(nn.Linear(3, d_model), nn.GELU())
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=128, dropout=0.2, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(num_cls * d_model, 64), nn.ReLU(), nn.Linear(64, 2))

    def tokens(self, x):
        """(B, 3C) -> (B, C, 3) after the input BatchNorm."""
        return self.norm(x).view(-1, 3, self.num_cls).transpose(1, 2)

    def forward(self, x):
        return self.head(self.encoder(self.embed(self.tokens(x))))


TARGET_MODELS = ("resnet18", "vgg16bn", "densenet121", "columnfc")


def build_model(name: str, num_cls: int, input_dim: int) -> nn.Module:
    """A target model with the release's init."""
    if name == "columnfc":
        model = ColumnFC(input_dim, num_cls)
    elif name in TARGET_MODELS:
        if input_dim != 3:
            raise UsageError(f"model {name} takes 3-channel images; config input_dim is {input_dim}")
        model = {"resnet18": resnet18, "vgg16bn": vgg16bn, "densenet121": densenet121}[name](num_cls)
    else:
        raise UsageError(f"unknown model_name '{name}'; valid: {', '.join(TARGET_MODELS)}")
    return release_init(model)


ATTACK_MODELS = ("mia_fc", "transformer")


def build_attack_model(kind: str, input_dim: int, num_cls: int) -> nn.Module:
    """SAMIA's transformer or the MLP of the NN attacks and ADV's inference model, with the release's init."""
    if kind == "transformer":
        return release_init(SamiaTransformer(num_cls))
    if kind == "mia_fc":
        return release_init(mia_fc(input_dim))
    raise ValueError(f"unknown attack model kind '{kind}'; valid: {', '.join(ATTACK_MODELS)}")
